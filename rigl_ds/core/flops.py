"""FLOPs accounting as the RigL paper counts it (SPEC §7).

Only the products of ``nn.Conv*d``, ``nn.Linear``, Hugging Face ``Conv1D`` layers and
``nn.MultiheadAttention``'s projections are counted (a multiply-add is 2
FLOPs); BatchNorm, pooling, activations, biases and additions are left out of both the dense and
the sparse count. A masked layer with density d costs d times its dense products; an unmasked
conv/linear layer is counted dense in both. A module with an ``attention_macs(x)`` method (the
built-in GPT's attention) adds the products of attention that no weight holds (Q K^T and the
weighted sum of V, which grow with the sequence length), dense in both counts, as the per-layer
entry ``<module>.attention``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import is_hf_conv1d


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one example, dense and at the given densities, and per layer."""

    dense: float
    sparse: float
    per_layer: dict[str, tuple[float, float]]  # weight name -> (dense, sparse)

    @property
    def inference_ratio(self) -> float:
        return self.sparse / self.dense if self.dense else 1.0

    def at(self, densities: Mapping[str, float]) -> float:
        """Sparse forward FLOPs of one example at other densities (layers not named count dense)."""
        return sum(d * densities.get(name, 1.0) for name, (d, _) in self.per_layer.items())


def _macs_per_example(module: nn.Module, out: Tensor) -> float:
    """Multiply-adds of one example: for conv, out positions x (in/groups) x kernel; for linear,
    out features x in features x any extra leading dims."""
    batch = out.shape[0]
    if isinstance(module, nn.modules.conv._ConvNd):
        per_out = module.weight.shape[1] * math.prod(module.weight.shape[2:])
        return out.numel() / batch * per_out
    if isinstance(module, nn.Linear):
        return out.numel() / batch * module.in_features
    if is_hf_conv1d(module):            # Hugging Face's Conv1D: weight (in, out)
        return out.numel() / batch * module.weight.shape[0]
    raise TypeError(type(module))


def _mha_macs(module: nn.MultiheadAttention, inputs) -> dict[str, float]:
    """Multiply-adds per example of ``nn.MultiheadAttention`` (its projections are not module
    calls): Q/K/V projections per weight, the output projection, and the attention products."""
    q, k = inputs[0], inputs[1]
    if q.dim() == 2:                                    # unbatched (L, E)
        lq, lk = q.shape[0], k.shape[0]
    else:
        lq, lk = (q.shape[1], k.shape[1]) if module.batch_first else (q.shape[0], k.shape[0])
    e = module.embed_dim
    proj = {"q": lq * e * e, "k": lk * module.kdim * e, "v": lk * module.vdim * e}
    out = {"out_proj.weight": lq * e * e, "attention": 2.0 * lq * lk * e}
    if module.in_proj_weight is not None:
        out["in_proj_weight"] = float(sum(proj.values()))
    else:
        out.update({f"{w}_proj_weight": float(m) for w, m in proj.items()})
    return out


def forward_flops(
    model: nn.Module,
    sample_input: Tensor,
    densities: Mapping[str, float] | None = None,
) -> ForwardFlops:
    """Measure forward FLOPs per example with hooks during one forward pass on ``sample_input``.

    ``densities`` maps weight names (``layer1.0.conv1.weight``) to their density; layers not in
    it count dense. Works on the meta device (no real computation).
    """
    densities = dict(densities or {})
    records: dict[str, tuple[float, float]] = {}
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, _inputs, out: Tensor) -> None:
        name = f"{names[id(module)]}.weight" if names[id(module)] else "weight"
        dense = 2.0 * _macs_per_example(module, out)
        sparse = dense * densities.get(name, 1.0)
        prev = records.get(name, (0.0, 0.0))
        records[name] = (prev[0] + dense, prev[1] + sparse)  # a module called twice counts twice

    def attention_hook(module: nn.Module, inputs, _out) -> None:
        # products of no weight (attention scores, their weighted sum): dense in both counts
        name = f"{names[id(module)]}.attention"
        dense = 2.0 * module.attention_macs(inputs[0])
        prev = records.get(name, (0.0, 0.0))
        records[name] = (prev[0] + dense, prev[1] + dense)

    def mha_hook(module: nn.MultiheadAttention, inputs, _out) -> None:
        base = names[id(module)]
        for part, macs in _mha_macs(module, inputs).items():
            name = f"{base}.{part}" if base else part
            dense = 2.0 * macs
            sparse = dense if part == "attention" else dense * densities.get(name, 1.0)
            prev = records.get(name, (0.0, 0.0))
            records[name] = (prev[0] + dense, prev[1] + sparse)

    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or is_hf_conv1d(module):
            handles.append(module.register_forward_hook(hook))
        if callable(getattr(module, "attention_macs", None)):
            handles.append(module.register_forward_hook(attention_hook))
        if isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_hook(mha_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():       # (nn.TransformerEncoderLayer takes no fused path with hooks attached)
            model(sample_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unknown = set(densities) - set(records)
    if unknown:
        raise ValueError(f"densities name layers that the forward pass never used: {sorted(unknown)}")
    return ForwardFlops(
        dense=sum(d for d, _ in records.values()),
        sparse=sum(s for _, s in records.values()),
        per_layer=records,
    )


def training_flops_ratio(
    f_sparse: float,
    f_dense: float,
    *,
    total_steps: int,
    delta: int,
    t_end: int,
    dense_grad: bool,
) -> float:
    """Training FLOPs of a run at a constant density relative to dense training (3·f_D per
    step), per SPEC §7.

    A method whose grow score reads the dense gradient (``dense_grad``, RigL):
    (3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1) per step while t < T_end, 3·f_S after. Otherwise (SET,
    static): 3·f_S every step.
    """
    if total_steps <= 0 or f_dense <= 0:
        raise ValueError("total_steps and f_dense must be positive")
    per_step_sparse = 3.0 * f_sparse
    if dense_grad:
        end = min(max(t_end, 0), total_steps)
        during = (3.0 * f_sparse * delta + 2.0 * f_sparse + f_dense) / (delta + 1)
        total = during * end + per_step_sparse * (total_steps - end)
    else:
        total = per_step_sparse * total_steps
    return total / (3.0 * f_dense * total_steps)


def timeline_flops_ratio(segments: Sequence[tuple[int, float]], f_dense: float, total_steps: int) -> float:
    """Training FLOPs relative to dense of a run whose density changes (GMP): ``segments`` are
    (first step, sparse forward FLOPs from that step on), in step order, the first at step 0; each
    step costs 3·f_S of its segment (no dense gradient is read)."""
    if total_steps <= 0 or f_dense <= 0:
        raise ValueError("total_steps and f_dense must be positive")
    if not segments or segments[0][0] != 0:
        raise ValueError("segments must start at step 0")
    total = 0.0
    for i, (start, f) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else total_steps
        total += 3.0 * f * max(0, min(end, total_steps) - start)
    return total / (3.0 * f_dense * total_steps)
