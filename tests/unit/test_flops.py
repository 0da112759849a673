import pytest
import torch
import torchvision
from torch import nn

from rigl_ds.core import (forward_flops, get_distribution, nnz_for, select_layers, timeline_flops_ratio,
                          training_flops_ratio)


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
    r = training_flops_ratio(fs, fd, total_steps=1000, delta=100, t_end=800, dense_grad=True)
    during = (3 * 100 + 2 + 10) / 101
    assert r == pytest.approx((during * 800 + 3 * 200) / (30 * 1000))
    assert training_flops_ratio(fs, fd, total_steps=1000, delta=100, t_end=800, dense_grad=False) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="positive"):
        training_flops_ratio(fs, fd, total_steps=0, delta=1, t_end=1, dense_grad=False)


def test_timeline_ratio_sums_each_segment():
    # dense for 100 steps, then f=4 for 50, then f=1 to the end (1000 steps); dense f = 10
    r = timeline_flops_ratio([(0, 10.0), (100, 4.0), (150, 1.0)], 10.0, 1000)
    assert r == pytest.approx((100 * 10 + 50 * 4 + 850 * 1) / (10 * 1000))
    with pytest.raises(ValueError, match="step 0"):
        timeline_flops_ratio([(5, 1.0)], 10.0, 10)


def test_forward_flops_at_other_densities():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    f = forward_flops(model, torch.randn(1, 8), {"0.weight": 0.5})
    assert f.at({"0.weight": 0.25, "1.weight": 0.5}) == pytest.approx(2 * 32 * 0.25 + 2 * 8 * 0.5)
    assert f.at({}) == f.dense


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
