"""Small models and deterministic data shared by the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Conv -> BN -> conv -> linear -> linear, with biases, on 1x8x8 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def batch(step: int, size: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a given step: the same on every call."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (size,), generator=g)
    return x, y


def make(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().to(dtype)


def train_steps(model, optimizer, sparsifier, steps, start: int = 0, check=None, dtype=torch.float32):
    """Run ``steps`` plain-PyTorch steps; ``check(step)`` runs after each."""
    for t in range(start, start + steps):
        x, y = batch(t, dtype=dtype)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if sparsifier.step():
            optimizer.step()
        if check is not None:
            check(t)


class PlanNet(nn.Module):
    """A hand-countable net for ``plan``: conv 1->4 (3x3, pad 1) on 8x8, then linear 256->10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def plan_net(num_classes: int = 10) -> PlanNet:
    return PlanNet(num_classes)


class Conv1D(nn.Module):
    """The layout of Hugging Face's GPT-2 ``Conv1D`` (weight (in, out), y = x @ W + b), without
    importing transformers: rigl_ds recognises it by name and layout."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Conv1D":
        """The same map as ``linear``: its weight transposed (and its bias, or zeros)."""
        out = cls(linear.out_features, linear.in_features).to(linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight.t())
            out.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(linear.out_features))
        return out

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class NoBNCNN(nn.Module):
    """TinyCNN without BatchNorm: per-rank batch statistics would differ from one big batch."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def make_nobn(seed: int = 0, dtype: torch.dtype = torch.float64) -> NoBNCNN:
    torch.manual_seed(seed)
    return NoBNCNN().to(dtype)


POISON = 7.0


def poison_inactive(states: dict[str, list[torch.Tensor]], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write :data:`POISON` into the optimizer state (tensors of each layer, in place) at every
    inactive position, just before a mask update; returns the masks as they were. A position the
    update grows must come out with its state reset to 0 (SPEC: grown positions start fresh)."""
    for n, ts in states.items():
        for t in ts:
            t[~masks[n]] = POISON
    return {n: m.clone() for n, m in masks.items()}


def assert_grown_state_reset(states: dict[str, list[torch.Tensor]], old: dict[str, torch.Tensor],
                             new: dict[str, torch.Tensor]) -> int:
    """After the update: the state of every grown position is exactly 0; then the poison left at
    positions still inactive is cleared (in place: they held 0 before :func:`poison_inactive`), so
    the run continues as it would have. Returns how many positions were grown."""
    grown_total = 0
    for n, ts in states.items():
        grown = new[n] & ~old[n]
        grown_total += int(grown.sum())
        assert ts, n
        for t in ts:
            assert torch.count_nonzero(t[grown]) == 0, (n, "state of grown positions not reset")
            t[~new[n]] = 0
    return grown_total


class NeedsRealTensors(nn.Module):
    """A user model whose forward reads a value on the host (``.item()``): it cannot run on the meta device."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if x.abs().max().item() > 0 else 0.0
        return self.fc2(torch.relu(self.fc1(x.flatten(1)))) * scale


def needs_real_tensors(num_classes: int = 10) -> NeedsRealTensors:
    return NeedsRealTensors(num_classes)


def assert_resume_exact(fresh, total: int, cut: int, restored=None):
    """A run of ``total`` plain steps equals one saved at ``cut`` (model, optimizer and sparsifier
    state through torch.save, weights_only), loaded into a fresh build of another seed and run to
    ``total``: weights, optimizer state, masks, counts and the last update bit for bit.
    ``fresh(seed)`` returns (model, optimizer, sparsifier); ``restored(saved, loaded)`` may check the
    sparsifiers right after the load. Returns (the saved sparsifier, the uninterrupted one)."""
    import io

    model, opt, sp = fresh(0)
    train_steps(model, opt, sp, total)
    m2, o2, s2 = fresh(0)
    train_steps(m2, o2, s2, cut)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sp": s2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3, o3, s3 = fresh(123)
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sp"])
    if restored is not None:
        restored(s2, s3)
    train_steps(m3, o3, s3, total - cut, start=cut)
    for a, b in zip(model.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state_dict()["state"].values(), o3.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(sp.masks[k], s3.masks[k]) for k in sp.masks)
    assert sp.last_update == s3.last_update and sp.nnz == s3.nnz
    return s2, sp
