"""Which weights of a transformer are sparse: nn.MultiheadAttention's fused and separate Q/K/V
projections, Hugging Face's transposed Conv1D, MLPs; LM heads and embeddings dense unless asked,
a tied weight masked once; RigL keeping masked attention weights at exactly zero."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_ds import RigL
from rigl_ds.core.layers import select_layers
from rigl_ds.core.structures import StructureError
from tests.helpers import Conv1D


class TinyLM(nn.Module):
    """Embedding, one encoder layer (fused-QKV attention), a Conv1D MLP, an untied head it names."""

    def __init__(self, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.sep = nn.MultiheadAttention(d, 2, kdim=8, vdim=8, batch_first=True)     # separate q/k/v weights
        self.c_fc = Conv1D(4 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, tokens):
        h = self.block(self.emb(tokens))
        kv = h[..., :8]
        h = h + self.sep(h, kv, kv, need_weights=False)[0]
        h = h + self.c_fc(h)[..., :h.shape[-1]]
        return self.lm_head(h)


def test_attention_projections_and_conv1d_are_masked_the_head_and_embedding_are_not():
    layers = {l.name: l for l in select_layers(TinyLM())}
    assert list(layers) == [
        "block.self_attn.in_proj_weight", "block.self_attn.out_proj.weight", "block.linear1.weight",
        "block.linear2.weight", "sep.q_proj_weight", "sep.k_proj_weight", "sep.v_proj_weight", "sep.out_proj.weight",
        "c_fc.weight"]
    assert layers["block.self_attn.in_proj_weight"].shape == (48, 16)         # fused Q, K, V: (3d, d), (out, in)
    assert layers["sep.k_proj_weight"].shape == (16, 8)
    assert layers["c_fc.weight"].transposed and layers["c_fc.weight"].shape == (16, 64)
    assert not any(l.transposed for n, l in layers.items() if n != "c_fc.weight")
    # asked for: the head (by module name), one projection left out (by parameter name)
    names = [l.name for l in select_layers(TinyLM(), include=["lm_head"], exclude=["*.v_proj_weight"])]
    assert "lm_head.weight" in names and "sep.v_proj_weight" not in names and "emb.weight" not in names
    only_qkv = [l.name for l in select_layers(TinyLM(), include=["*in_proj_weight"], exclude=["block.linear*", "c_fc",
                                                                                               "*out_proj", "sep"])]
    assert only_qkv == ["block.self_attn.in_proj_weight"]


def test_the_head_stays_dense_inside_a_wrapper():
    """A wrapper holding the model as ``.module`` (DDP, as Accelerate prepares it on several GPUs)."""
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    names = [l.name for l in select_layers(Wrapper(TinyLM()))]
    assert "module.block.linear1.weight" in names and "module.lm_head.weight" not in names


def test_a_tied_head_is_dense_by_default_and_masked_once_when_asked():
    model = TinyLM()
    model.lm_head.weight = model.emb.weight
    assert not any(l.name in ("emb.weight", "lm_head.weight") for l in select_layers(model))
    tied = [l.name for l in select_layers(model, include=["emb", "lm_head"]) if l.name in ("emb.weight",
                                                                                          "lm_head.weight")]
    assert tied == ["emb.weight"]


def test_rigl_keeps_masked_attention_and_conv1d_weights_at_zero_with_exact_counts():
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = RigL(model, opt, total_steps=20, sparsity=0.75, delta=5, distribution="erk")
    params = dict(model.named_parameters())
    for t in range(20):
        x = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        logits = model(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, 40), x[:, 1:].reshape(-1)).backward()
        if sp.step():
            opt.step()
        for n, m in sp.masks.items():
            assert int(m.sum()) == sp.nnz[n], (t, n)
            assert torch.count_nonzero(params[n].detach()[~m]) == 0, (t, n)
    assert sp.last_update["step"] == 10 and sp.last_update["churn"] > 0
    assert sp.nnz["block.self_attn.in_proj_weight"] < 48 * 16


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def run_masks(layer: nn.Module, method: str, structure: str, transpose: bool) -> list[torch.Tensor]:
    """``method`` with ``structure`` on one layer whose weight and gradients are set, not computed
    (the same numbers for a Linear and, transposed, for the Conv1D holding its transpose): each
    update's mask in the Linear's (out, in) layout."""
    from rigl_ds.core.methods import get_method

    model = OneLayer(layer)
    w = model.layer.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = dict(sparsity=0.5, distribution="uniform") if ":" in structure else dict(sparsity=0.75)
    sp = get_method(method)(model, opt, total_steps=24, delta=3, structure=structure, seed=4, **kw)
    out = [sp.masks["layer.weight"].clone()]
    for t in range(24):
        g = torch.randn(24, 16, generator=torch.Generator().manual_seed(t))
        w.grad = g.t().clone() if transpose else g
        if sp.step():
            opt.step()
        if sp.last_update and sp.last_update["step"] == t:
            out.append(sp.masks["layer.weight"].clone())
    return [m.t() if transpose else m for m in out]


@pytest.mark.parametrize("method,structure", [("rigl", "fan_in"), ("set", "2:4"), ("gmp", "fan_in"),
                                              ("gmp", "2:4")])
def test_a_structure_groups_a_conv1d_along_its_input_dim_as_the_linear_of_its_transpose(method, structure):
    """A Conv1D (weight stored (in, out)) gets exactly the masks of the nn.Linear holding its
    transpose: fan_in keeps the same count in every output column, 2:4 two of every 4 consecutive
    inputs, at the start and after every update."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 24, bias=False)
    conv = Conv1D.from_linear(linear)
    want = run_masks(linear, method, structure, transpose=False)
    got = run_masks(conv, method, structure, transpose=True)
    assert len(want) == (7 if method == "gmp" else 6)            # the start and each update (t_end 0.75)
    changed = 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), i
        changed += int(i > 0 and not torch.equal(w, want[i - 1]))
        if structure == "fan_in":
            assert len(set(w.sum(1).tolist())) == 1, i            # per output: the Conv1D's columns
        if structure == "2:4":                                   # along each output's inputs: the Conv1D's dim 0
            assert len(set(w.reshape(-1, 4).sum(1).tolist())) == 1, i     # (GMP: 4, 3, then 2 of every 4)
    assert changed >= 2                                          # masks moved (GMP 2:4: 4 -> 3 -> 2)
    if structure == "2:4":
        assert want[-1].reshape(-1, 4).sum(1).eq(2).all()


def test_neuron_ablation_on_a_transposed_conv1d_is_refused_by_name():
    with pytest.raises(StructureError, match=r"gamma_sal=0.9 .* \(Hugging Face Conv1D\): c_fc.weight"):
        RigL(TinyLM(), None, total_steps=20, sparsity=0.75, structure="fan_in", gamma_sal=0.9,
             include=["lm_head"])
    RigL(TinyLM(), None, total_steps=20, sparsity=0.75, structure="fan_in", gamma_sal=0.9, exclude=["c_fc"])


def test_flops_count_attention_projections_conv1d_and_scores_by_hand():
    """nn.MultiheadAttention's projections are not module calls and Conv1D is not a Linear: both are
    counted (with their masks' density), with the attention products as ``<module>.attention``."""
    from rigl_ds.core.flops import forward_flops

    model = TinyLM()
    names = [l.name for l in select_layers(model)]
    f = forward_flops(model, torch.zeros(1, 12, dtype=torch.long), {n: 0.25 for n in names})
    t, d = 12, 16
    assert f.per_layer["block.self_attn.in_proj_weight"] == (2.0 * 3 * t * d * d, 2.0 * 3 * t * d * d * 0.25)
    assert f.per_layer["block.self_attn.out_proj.weight"][0] == 2.0 * t * d * d
    assert f.per_layer["block.self_attn.attention"] == (2.0 * 2 * t * t * d,) * 2
    assert f.per_layer["sep.k_proj_weight"][0] == 2.0 * t * 8 * d and f.per_layer["sep.q_proj_weight"][0] == 2.0 * t * d * d
    assert f.per_layer["c_fc.weight"] == (2.0 * t * d * 4 * d, 2.0 * t * d * 4 * d * 0.25)
    assert f.per_layer["block.linear1.weight"][0] == 2.0 * t * d * 32


def test_a_structure_error_on_a_conv1d_names_its_stored_shape_and_grouping():
    layer = OneLayer(Conv1D(6, 8))                     # stored (8, 6): 6 outputs of 8 inputs
    with pytest.raises(StructureError, match=r"rows of 8 weights do not split into groups of M=3 .*'layer.weight' is "
                                             r"stored \(in, out\) as \(8, 6\), .* grouped as its transpose \(6, 8\)"):
        RigL(layer, None, total_steps=20, sparsity=1 - 2 / 3, distribution="uniform", structure="2:3")
