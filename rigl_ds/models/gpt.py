"""A decoder-only GPT (GPT-2's layout, pre-norm) for ``rigl-ds train``: token and position
embeddings, ``n_layer`` blocks of causal self-attention (one fused Q/K/V ``nn.Linear`` and an
output projection) and a 4x MLP, a final LayerNorm and an LM head tied to the token embedding.

Which weights RigL masks by default: every ``nn.Linear`` of the blocks (Q/K/V, attention output,
MLP); the embeddings and the tied head stay dense (``get_output_embeddings``). Inputs are token ids
(B, T); the output is logits (B, T, vocab). ``attention_macs`` gives the multiply-adds of the
attention scores and their weighted sum, which no Linear holds (for the FLOPs count).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"model.kwargs.d_model={d_model} is not divisible by model.kwargs.n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def attention_macs(self, x: torch.Tensor) -> float:
        """Multiply-adds per sequence of Q K^T and of the weights times V (all T x T pairs, as the
        usual count; causal kernels may skip the masked half)."""
        t, d = x.shape[-2], x.shape[-1]
        return 2.0 * t * t * d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, n_layer: int = 4, n_head: int = 4, d_model: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight            # tied
        for name, p in self.named_parameters():     # GPT-2's init: N(0, 0.02), residual outputs scaled
            if p.dim() >= 2 and p.device.type != "meta":
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.context}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
