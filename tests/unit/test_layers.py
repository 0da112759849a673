import pytest
from torch import nn

from rigl_ds.core.layers import select_layers
from tests.helpers import TinyCNN


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.c1 = nn.Conv1d(8, 4, 3)
        self.c3 = nn.Conv3d(2, 2, 1)
        self.head = nn.Linear(8, 50, bias=True)
        self.head.weight = self.emb.weight  # tied


def test_default_selects_conv_and_linear_weights_only():
    names = [l.name for l in select_layers(TinyCNN())]
    assert names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_never_norms_biases_embeddings_and_tied_once():
    layers = select_layers(WithEmbedding())
    assert [l.name for l in layers] == ["proj.weight", "c1.weight", "c3.weight"]
    assert [l.is_conv for l in layers] == [False, True, True]
    # the tied head shares the embedding weight: masked only when listed, and once
    layers = select_layers(WithEmbedding(), include=["emb", "head"])
    assert [l.name for l in layers] == ["emb.weight", "proj.weight", "c1.weight", "c3.weight"]


def test_exclude_globs_match_module_or_parameter_names():
    assert [l.name for l in select_layers(TinyCNN(), exclude=["conv*"])] == ["fc1.weight", "fc2.weight"]
    assert [l.name for l in select_layers(TinyCNN(), exclude=["fc2.weight"])] == [
        "conv1.weight", "conv2.weight", "fc1.weight"]


def test_include_of_a_1d_weight_or_nothing_is_an_error():
    with pytest.raises(ValueError, match="norm.weight"):
        select_layers(WithEmbedding(), include=["norm"])
    with pytest.raises(ValueError, match="nope"):
        select_layers(TinyCNN(), include=["nope"])
