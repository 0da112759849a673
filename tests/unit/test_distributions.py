import pytest
import torchvision

from rigl_ds.core.distributions import achieved_density, er, erk, get_distribution, nnz_for, uniform, uniform_nv
from rigl_ds.core.layers import MaskedLayer, select_layers


def L(name, *shape):
    return MaskedLayer(name=name, module_name=name.rsplit(".", 1)[0], shape=tuple(shape), is_conv=len(shape) > 2)


def nnz_total(layers, dens):
    return sum(nnz_for(l.numel, dens[l.name]) for l in layers)


def test_erk_closed_form_two_layers():
    # raw = sum(shape)/prod(shape): fc 30/200, conv 12/72; eps*(30 + 12) = 0.5 * 272
    layers = [L("fc.weight", 10, 20), L("conv.weight", 4, 2, 3, 3)]
    d = erk(layers, 0.5)
    eps = 136 / 42
    assert d["fc.weight"] == pytest.approx(eps * 30 / 200)
    assert d["conv.weight"] == pytest.approx(eps * 12 / 72)
    # zeros: floor(200 * (1 - 0.48571)) = 102, floor(72 * (1 - 0.53968)) = 33
    assert nnz_for(200, d["fc.weight"]) == 98 and nnz_for(72, d["conv.weight"]) == 39
    assert nnz_total(layers, d) == 137   # flooring zeros rounds the target (136) up by < 1 per layer


def test_erk_caps_at_dense_and_resolves():
    layers = [L("big.weight", 100, 100), L("tiny.weight", 2, 3)]
    d = erk(layers, 0.5)
    assert d["tiny.weight"] == 1.0
    # rhs = (1 - S) * 10000 - S * 6 for the dense tiny layer
    assert d["big.weight"] == pytest.approx((5000 - 3) / 10000)
    assert nnz_total(layers, d) == 5003


def test_erk_cascading_caps_match_one_at_a_time():
    layers = [L("a.weight", 1000, 1000), L("b.weight", 3, 4), L("c.weight", 5, 6), L("d.weight", 20, 30)]
    d = erk(layers, 0.9)
    assert d["b.weight"] == 1.0 and d["c.weight"] == 1.0
    assert all(v <= 1.0 for v in d.values())
    target = 0.1 * sum(l.numel for l in layers)
    assert abs(nnz_total(layers, d) - target) <= len(layers)


def test_erk_power_scale_zero_is_uniform_over_all_layers():
    layers = [L("a.weight", 64, 32, 3, 3), L("b.weight", 128, 64)]
    d = erk(layers, 0.8, power_scale=0.0)
    assert d == pytest.approx({"a.weight": 0.2, "b.weight": 0.2})


def test_er_ignores_kernel_dims():
    layers = [L("conv.weight", 16, 8, 3, 3), L("fc.weight", 10, 16)]
    d = er(layers, 0.7)
    raw_conv, raw_fc = (8 + 16) / (8 * 16), (16 + 10) / (16 * 10)
    assert d["conv.weight"] / d["fc.weight"] == pytest.approx(raw_conv / raw_fc)
    total = sum(l.numel for l in layers)
    assert d["conv.weight"] * 1152 + d["fc.weight"] * 160 == pytest.approx(0.3 * total)


def test_uniform_first_conv_dense_final_linear_sparse():
    layers = [L("fc0.weight", 4, 4), L("conv1.weight", 8, 3, 3, 3), L("conv2.weight", 8, 8, 3, 3),
              L("fc.weight", 10, 8)]
    d = uniform(layers, 0.9)
    assert d == {"fc0.weight": pytest.approx(0.1), "conv1.weight": 1.0, "conv2.weight": pytest.approx(0.1),
                 "fc.weight": pytest.approx(0.1)}
    assert [nnz_for(l.numel, d[l.name]) for l in layers] == [16 - 14, 216, 576 - 518, 80 - 72]


def test_uniform_nv_keeps_first_conv_and_linear_layers_dense():
    layers = [L("conv1.weight", 8, 3, 3, 3), L("conv2.weight", 8, 8, 3, 3), L("fc.weight", 10, 8)]
    layers[2] = MaskedLayer("fc.weight", "fc", (10, 8), is_conv=False, is_linear=True)
    d = uniform_nv(layers, 0.9)
    assert d == {"conv1.weight": 1.0, "conv2.weight": pytest.approx(0.1), "fc.weight": 1.0}
    assert uniform(layers, 0.9)["fc.weight"] == pytest.approx(0.1)           # google-research/rigl: sparse
    assert uniform_nv(layers, 0.9, overrides={"fc": 0.5})["fc.weight"] == 0.5  # an override still wins


def test_resnet50_dense_layers_of_each_uniform():
    layers = select_layers(torchvision.models.resnet50(weights=None))
    for fn, dense in ((uniform, {"conv1.weight"}), (uniform_nv, {"conv1.weight", "fc.weight"})):
        d = fn(layers, 0.8)
        assert {n for n, v in d.items() if v == 1.0} == dense
        assert all(v == pytest.approx(0.2) for n, v in d.items() if n not in dense)


def test_overrides_excluded_from_the_solve_and_applied_as_given():
    layers = [L("conv1.weight", 16, 3, 3, 3), L("conv2.weight", 32, 16, 3, 3), L("fc.weight", 10, 32)]
    d = erk(layers, 0.9, overrides={"conv1.*": "dense", "fc.weight": 0.5})
    assert d["conv1.weight"] == 1.0 and d["fc.weight"] == 0.5
    assert d["conv2.weight"] == pytest.approx(0.1)   # the only layer left in the solve
    du = uniform(layers, 0.9, overrides={"conv1": 0.3})
    assert du["conv1.weight"] == pytest.approx(0.7)


def test_bad_inputs_name_the_value():
    layers = [L("fc.weight", 4, 4)]
    with pytest.raises(ValueError, match="1.5"):
        erk(layers, 1.5)
    with pytest.raises(ValueError, match="'fast'"):
        get_distribution("fast")
    with pytest.raises(ValueError, match="matches no masked layer"):
        erk(layers, 0.5, overrides={"nope": "dense"})
    with pytest.raises(ValueError, match="'sparse'"):
        erk(layers, 0.5, overrides={"fc": "sparse"})


def test_floor_of_zeros_exact():
    assert nnz_for(10, 0.3) == 3          # floor(0.7 * 10) = 7 zeros even with 1 - 0.3 round-off
    assert nnz_for(7, 0.5) == 4           # floor(3.5) = 3 zeros
    assert nnz_for(5, 1.0) == 5 and nnz_for(5, 0.0) == 0


@pytest.mark.parametrize("name,sparsity", [("erk", 0.8), ("erk", 0.9), ("er", 0.9), ("uniform", 0.8)])
def test_resnet50_global_density_hits_target_within_rounding(name, sparsity):
    layers = select_layers(torchvision.models.resnet50(weights=None))
    assert len(layers) == 54
    d = get_distribution(name)(layers, sparsity)
    total = sum(l.numel for l in layers)
    if name == "uniform":   # the first conv is dense on top of the target
        first = layers[0]
        expected = (first.numel + sum(nnz_for(l.numel, 1 - sparsity) for l in layers[1:])) / total
        assert achieved_density(layers, d) == pytest.approx(expected)
    else:
        assert abs(achieved_density(layers, d) - (1 - sparsity)) * total <= len(layers)
        assert all(0 < v <= 1.0 for v in d.values())
