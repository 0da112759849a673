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
