"""rigl_ds.kernels: the condensed gather kernel computes the masked dense layer (fp32, 1e-5) with
int16 and int32 indices, with and without bias, at any batch; CondensedLinear uses it for a single
row and falls back to torch's CSR kernel when kernels are off or cannot be built (logged, same
outputs)."""
import logging
import os
import shutil

import pytest
import torch
from torch import nn

import rigl_ds.kernels as kernels
from rigl_ds.export import CondensedLinear


def fan_in_layer(in_features, out_features, fan_in, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(generator=g)
        if bias:
            layer.bias.normal_(generator=g)
    keep = torch.rand(out_features, in_features, generator=g).argsort(1)[:, :fan_in]
    mask = torch.zeros(out_features, in_features, dtype=torch.bool).scatter_(1, keep, True)
    return layer, mask


@pytest.fixture
def kernel():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here (the CSR fallback is tested below)")
    op = kernels.condensed_kernel()
    assert op is not None, "the condensed kernel did not build on this machine (see the log)"
    return op


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features,index_dtype", [(300, torch.int16), (40000, torch.int32)])
def test_the_kernel_computes_the_masked_dense_layer(kernel, bias, in_features, index_dtype):
    layer, mask = fan_in_layer(in_features, 37, 23, bias)        # 23: not a multiple of the 4-way unroll
    c = CondensedLinear.from_linear(layer, mask)
    assert c.indices.dtype == index_dtype and c.values.shape == (37, 23)
    dense_w = layer.weight.detach() * mask
    g = torch.Generator().manual_seed(1)
    for rows in (1, 5):
        x = torch.randn(rows, in_features, generator=g)
        want = torch.nn.functional.linear(x, dense_w, layer.bias)
        got = kernel(x, c.values.detach(), c.indices, None if c.bias is None else c.bias.detach())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, in_features, generator=g)                 # the module's own path for one row
    torch.testing.assert_close(c(x), torch.nn.functional.linear(x, dense_w, layer.bias), rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_what_it_cannot_compute(kernel):
    layer, mask = fan_in_layer(16, 4, 3)
    c = CondensedLinear.from_linear(layer, mask)
    with pytest.raises(RuntimeError, match="float32 only"):
        kernel(torch.randn(1, 16, dtype=torch.float64), c.values.detach().double(), c.indices, None)
    with pytest.raises(RuntimeError, match="int16 or int32 indices"):
        kernel(torch.randn(1, 16), c.values.detach(), c.indices.long(), None)


def test_the_single_row_runs_the_kernel_and_a_batch_runs_csr(kernel, monkeypatch):
    layer, mask = fan_in_layer(64, 8, 6)
    c = CondensedLinear.from_linear(layer, mask)
    calls = []
    monkeypatch.setattr(kernels, "condensed_kernel", lambda: (lambda *a: calls.append(1) or kernel(*a)))
    with torch.inference_mode():
        c(torch.randn(1, 64))
        c(torch.randn(1, 1, 64))
        assert len(calls) == 2 and c._weight is None        # no CSR copy made for single rows
        c(torch.randn(3, 64))
    assert len(calls) == 2 and c._weight is not None
    x = torch.randn(1, 64, requires_grad=True)          # a gradient is wanted: the CSR path keeps the graph
    y = c(x)
    assert len(calls) == 2 and y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(x.grad, (layer.weight.detach() * mask).sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["disabled", "build fails"])
def test_without_the_kernel_the_csr_kernel_gives_the_same_outputs(why, monkeypatch, caplog):
    layer, mask = fan_in_layer(64, 8, 6)
    c = CondensedLinear.from_linear(layer, mask)
    x = torch.randn(1, 64)
    want = torch.nn.functional.linear(x, layer.weight.detach() * mask, layer.bias)
    monkeypatch.setattr(kernels, "_state", {})               # forget a kernel built by another test
    if why == "disabled":
        monkeypatch.setenv("RIGL_DS_KERNELS", "0")
    else:
        def no_compiler(**kwargs):
            raise RuntimeError("Error building extension 'rigl_ds_condensed': g++: not found")
        monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="rigl_ds.kernels"):
        assert kernels.condensed_kernel() is None
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)
    assert c._weight is not None                              # the CSR path ran
    warned = [r.getMessage() for r in caplog.records if r.name == "rigl_ds.kernels"]
    if why == "disabled":
        assert warned == []
    else:
        assert len(warned) == 1 and "g++: not found" in warned[0] and "CSR kernel instead" in warned[0]
        kernels.condensed_kernel()                            # not tried again, not logged again
        assert len([r for r in caplog.records if r.name == "rigl_ds.kernels"]) == 1


def test_reloading_a_condensed_layer_remakes_its_csr_view():
    layer, mask = fan_in_layer(64, 8, 6, seed=0)
    other, other_mask = fan_in_layer(64, 8, 6, seed=1)
    c = CondensedLinear.from_linear(layer, mask)
    x = torch.randn(4, 64)                                    # 4 rows: the CSR path, which caches a view
    c(x)
    c.load_state_dict(CondensedLinear.from_linear(other, other_mask).state_dict())
    want = torch.nn.functional.linear(x, other.weight.detach() * other_mask, other.bias)
    torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)


def test_loading_indices_outside_the_layer_is_refused():
    layer, mask = fan_in_layer(64, 8, 6)
    c = CondensedLinear.from_linear(layer, mask)
    state = c.state_dict()
    state["indices"] = state["indices"].clone()
    state["indices"][3, 0] = 64
    with pytest.raises(ValueError, match=r"loaded indices span \[\d+, 64\], outside the layer's inputs 0..63"):
        c.load_state_dict(state)
