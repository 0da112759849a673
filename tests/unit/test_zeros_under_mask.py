"""Measures which optimizers keep masked weights at exactly 0 with gradient masking alone."""
import pytest
import torch

from rigl_ds import RigL
from rigl_ds.engines.local import ZERO_PRESERVING_OPTIMIZERS
from tests.helpers import make, train_steps

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov_loop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                                   weight_decay=1e-4, foreach=False),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_l2_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_loop": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


def check_invariants(model, opt, rigl):
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        w = params[name]
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == rigl.nnz[name], name
        assert torch.count_nonzero(w.detach()[~mask]) == 0, name
        for key, state in opt.state.get(w, {}).items():
            if torch.is_tensor(state) and state.shape == w.shape:
                assert torch.count_nonzero(state[~mask]) == 0, (name, key)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gradient_masking_alone_keeps_zeros(name):
    model = make()
    opt = OPTIMIZERS[name](model.parameters())
    assert isinstance(opt, ZERO_PRESERVING_OPTIMIZERS)
    # rezero_weights=False: only gradients are masked; weights are never re-zeroed after a step.
    rigl = RigL(model, opt, total_steps=60, sparsity=0.8, delta=5, rezero_weights=False)
    updates = []
    train_steps(model, opt, rigl, 60, check=lambda t: (check_invariants(model, opt, rigl),
                                                        updates.append(rigl.last_update)))
    assert len({u["step"] for u in updates if u}) == rigl.schedule.num_updates == 8


class DriftingSGD(torch.optim.SGD):
    """An optimizer that moves every weight even where the gradient is 0 (like noise injection)."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return out


@pytest.mark.parametrize("cls", [DriftingSGD, torch.optim.RMSprop, torch.optim.Adagrad])
def test_other_optimizers_get_weights_rezeroed_after_each_step(cls):
    model = make()
    opt = cls(model.parameters(), lr=1e-2)
    rigl = RigL(model, opt, total_steps=30, sparsity=0.8, delta=5)
    assert rigl.rezero_weights is True
    train_steps(model, opt, rigl, 30, check=lambda t: check_invariants(model, opt, rigl))


def test_without_rezero_a_drifting_optimizer_breaks_the_invariant():
    model = make()
    opt = DriftingSGD(model.parameters(), lr=1e-2)
    rigl = RigL(model, opt, total_steps=10, sparsity=0.8, delta=5, rezero_weights=False)
    train_steps(model, opt, rigl, 1)
    with pytest.raises(AssertionError):
        check_invariants(model, opt, rigl)
