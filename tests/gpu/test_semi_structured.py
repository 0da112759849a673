"""2:4 export through torch's semi-structured sparse tensors on CUDA; skipped cleanly without a GPU.
(It has not run yet: no GPU was lent to the sessions that wrote it.)"""
import pytest
import torch
from torch import nn

from rigl_ds import RigL
from rigl_ds.export import SemiStructuredLinear, convert, load_exported, save_exported

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_two_four_linear_layers_run_semi_structured_and_match_the_masked_model(tmp_path):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda()

    model = build()
    sp = RigL(model, None, total_steps=10, sparsity=0.5, distribution="uniform", structure="2:4")
    ref = build()
    ref.load_state_dict(model.state_dict())
    out, replaced = convert(model, sp.masks, "semi_structured")
    assert replaced == {"0": "semi_structured", "2": "semi_structured"}
    assert all(isinstance(out.get_submodule(n), SemiStructuredLinear) for n in replaced)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        torch.testing.assert_close(out(x), ref(x), rtol=1e-2, atol=1e-2)     # fp16 accumulation order differs
    path = save_exported(out, replaced, "semi_structured", tmp_path / "m.safetensors")
    loaded = load_exported(build(), path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), ref(x), rtol=1e-2, atol=1e-2)
