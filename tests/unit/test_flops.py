import pytest
import torch
import torchvision
from torch import nn

from rigl_ds.core import forward_flops, get_distribution, nnz_for, select_layers, training_flops_ratio


def test_hand_counted_conv_linear_net():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 10))
    f = forward_flops(model, torch.randn(2, 3, 8, 8),
                      {"0.weight": 0.5, "3.weight": 0.25, "5.weight": 0.1})
    conv0 = 2 * (8 * 8 * 8) * (3 * 3 * 3)          # out positions x (in x kh x kw) MACs
    conv3 = 2 * (4 * 4 * 4) * (4 * 3 * 3)          # groups=2: 4 input channels per output
    fc = 2 * 64 * 10
    assert f.per_layer == {"0.weight": (conv0, conv0 * 0.5), "3.weight": (conv3, conv3 * 0.25),
                           "5.weight": (fc, fc * 0.1)}
    assert f.dense == conv0 + conv3 + fc
    assert f.sparse == pytest.approx(conv0 * 0.5 + conv3 * 0.25 + fc * 0.1)
    assert f.inference_ratio == pytest.approx(f.sparse / f.dense)


def test_training_ratio_formula():
    fs, fd = 1.0, 10.0
    # RigL: (3 fs dT + 2 fs + fd)/(dT + 1) for t < T_end, 3 fs after; over 3 fd per step
    r = training_flops_ratio(fs, fd, total_steps=1000, delta=100, t_end=800, method="rigl")
    during = (3 * 100 + 2 + 10) / 101
    assert r == pytest.approx((during * 800 + 3 * 200) / (30 * 1000))
    assert training_flops_ratio(fs, fd, total_steps=1000, delta=100, t_end=800, method="set") == pytest.approx(0.1)
    assert training_flops_ratio(fs, fd, total_steps=1000, delta=100, t_end=800, method="dense") == 1.0
    with pytest.raises(ValueError, match="'magic'"):
        training_flops_ratio(fs, fd, total_steps=10, delta=1, t_end=1, method="magic")


@pytest.mark.parametrize("dist,sparsity,official", [
    ("erk", 0.8, 0.42), ("uniform", 0.8, 0.23), ("erk", 0.9, 0.24), ("uniform", 0.9, 0.13)])
def test_resnet50_inference_flops_match_the_official_readme(dist, sparsity, official):
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    layers = select_layers(model)
    d = get_distribution(dist)(layers, sparsity)
    exact = {l.name: nnz_for(l.numel, d[l.name]) / l.numel for l in layers}
    f = forward_flops(model, torch.empty(1, 3, 224, 224, device="meta"), exact)
    assert f.dense == pytest.approx(8.18e9, rel=1e-3)   # 4.09 GMACs
    assert f.inference_ratio == pytest.approx(official, abs=0.01)
