"""The ordinary step stays cheap: no mask-sized allocation, no dense-gradient copy."""
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from rigl_ds import RigL
from tests.helpers import batch, make


def allocations_during(fn) -> list[int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


def test_ordinary_step_allocates_no_mask_sized_tensor():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = RigL(model, opt, total_steps=100, sparsity=0.9, delta=10, grad_accumulation_n=3)
    smallest = min(m.numel() for m in sp.masks.values())   # 72 elements (conv1)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    sp._step = 3                                         # an ordinary step, outside any accumulation window
    assert not sp.wants_dense_grad() and not sp.is_update_step()
    allocs = allocations_during(sp.step)
    assert all(a < smallest for a in allocs), allocs
    assert sp._score is None                             # no dense-gradient copy was kept
    # the accumulation steps before an update do copy the dense gradient (by design)
    sp._step = 8
    F.cross_entropy(model(x), y).backward()
    assert sp.wants_dense_grad()
    allocs = allocations_during(sp.step)
    assert sum(allocs) >= 4 * sum(m.numel() for m in sp.masks.values())


def test_mask_multiplier_equals_where_across_chunks_and_dtypes():
    """The CPU chunk loop (uint8 mask widened chunk by chunk) gives torch.where's result, in place
    and into another tensor, across chunk boundaries, for float32 and bf16, and leaves the mask
    and (out of place) the source untouched."""
    from rigl_ds.engines.local import MaskMultiplier

    mul = MaskMultiplier()
    g = torch.Generator().manual_seed(0)
    for n in (mul.SMALL - 1, mul.CHUNK * 2 + 12345):           # the where path and the chunk loop
        for dtype in (torch.float32, torch.bfloat16):
            src = torch.randn(n, generator=g).to(dtype).view(-1, 5 if n % 5 == 0 else 1)
            mask = torch.rand(src.shape, generator=g) < 0.1
            want = torch.where(mask, src, torch.zeros((), dtype=dtype))
            keep_src, keep_mask = src.clone(), mask.clone()
            out = mul(src, mask, out=torch.empty_like(src))
            assert torch.equal(out, want) and torch.equal(src, keep_src) and torch.equal(mask, keep_mask)
            assert mul(src, mask, out=src) is src and torch.equal(src, want)
            assert mul.chunked(src) == (n >= mul.SMALL)


def test_deepspeed_gradient_hook_masks_small_and_large_layers_and_follows_mask_changes():
    """The DeepSpeed adapter's tensor hook: on an ordinary step each masked gradient is the dense
    gradient zeroed outside the mask, for a layer under LocalEngine.FUSE_BELOW (a cached mask in
    the gradient's dtype) and one above it (the chunk loop); after a mask is changed in place, the
    next backward uses the new mask; a step feeding a grow score passes the dense gradient."""
    from types import SimpleNamespace

    from torch import nn

    from rigl_ds.core.layers import MaskedLayer
    from rigl_ds.engines.deepspeed import DeepSpeedEngineAdapter
    from rigl_ds.engines.local import LocalEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 1500))   # 6144 and 144000 weights
    assert model[0].weight.numel() < LocalEngine.FUSE_BELOW < model[2].weight.numel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fake = SimpleNamespace(module=model, basic_optimizer=opt, optimizer=opt, zero_optimization_stage=lambda: 0)
    adapter = DeepSpeedEngineAdapter(fake, opt)
    layers = [MaskedLayer(f"{i}.weight", str(i), tuple(model[i].weight.shape), is_conv=False, is_linear=True)
              for i in (0, 2)]
    masks = {l.name: torch.rand(l.shape) < 0.2 for l in layers}
    dense = {"on": False}
    adapter.bind(layers, masks, lambda: dense["on"])
    x = torch.randn(8, 64)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        return {n: model.get_parameter(n).grad.clone() for n in masks}

    dense["on"] = True
    full = grads()
    assert all(torch.count_nonzero(g[~masks[n]]) > 0 for n, g in full.items())    # the hook let them through
    dense["on"] = False
    for _ in range(2):
        got = grads()
        for n, m in masks.items():
            assert torch.equal(got[n], torch.where(m, full[n], torch.zeros(()))), n
        for m in masks.values():
            m.copy_(torch.rand(m.shape) < 0.5)                                  # changed in place


def test_float_masks_follow_in_place_mask_changes_and_refuse_what_they_do_not_serve():
    """The cached float copy is the mask's, in the asked dtype, and is remade after any in-place
    write to the mask (no engine announces it); large layers and other shapes get None."""
    from rigl_ds.engines.local import FloatMasks

    cache = FloatMasks(below=100)
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    g32, g16 = torch.randn(8, 8), torch.randn(8, 8).to(torch.bfloat16)
    first = cache.get("w", mask, g32)
    assert first.dtype == torch.float32 and torch.equal(first, mask.float())
    assert cache.get("w", mask, g32) is first                      # unchanged: the same copy
    mask[0].logical_not_()                                         # an in-place change, unannounced
    assert torch.equal(cache.get("w", mask, g32), mask.float())
    mask.copy_(torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(cache.get("w", mask, g32), torch.ones(8, 8))
    assert cache.get("w", mask, g16).dtype == torch.bfloat16
    assert cache.get("big", torch.ones(10, 10, dtype=torch.bool), torch.randn(10, 10)) is None
    assert cache.get("w", mask, torch.randn(4, 16)) is None          # another shape (a shard)
