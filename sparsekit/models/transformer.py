"""A small transformer encoder classifier with hand-written attention (no fused SDPA kernels).

Token + learned position embeddings, ``layers`` post-LayerNorm blocks as in BERT
(``x = LN(x + attn(x)); x = LN(x + ffn(x))``), mean pooling over tokens and a linear classifier ``fc``.
Attention uses one fused ``qkv`` Linear (dim -> 3*dim) and an output projection ``proj``; the feed-forward
is ``FFN`` (``fc1`` dim -> ffn, GELU, ``fc2`` ffn -> dim). Every Linear is a plain ``nn.Linear``, so
block / n:m / channel pruning and the sparse kernels see ordinary GEMMs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._base import ReferenceModel, check_positive_int
from .mlp import FFN

__all__ = ["Attention", "EncoderLayer", "TransformerEncoder", "bert_base_config"]


def bert_base_config(num_classes: int = 2) -> dict[str, int]:
    """Keyword arguments for a BERT-base-sized ``TransformerEncoder`` (about 110M parameters)."""
    return {"vocab": 30522, "dim": 768, "heads": 12, "ffn": 3072, "layers": 12,
            "num_classes": num_classes, "max_len": 512}


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` (fused), softmax(q k^T / sqrt(d)) v, ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)   # [b, heads, t, t]
        if pad_mask is not None:
            scores = scores.masked_fill(~pad_mask[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ v                                 # [b, heads, t, head_dim]
        # the inner width follows the head count (not the input width d), so heads can be pruned
        return self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Post-LN encoder block: ``ln1(x + attn(x))`` then ``ln2(x + ffn(x))``."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn)
        self.ln2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x, pad_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


class TransformerEncoder(ReferenceModel):
    """Encoder classifier over token ids ``[batch, seq]`` -> logits ``[batch, num_classes]``.

    ``forward(ids, pad_mask=None)``: ``pad_mask`` is a bool ``[batch, seq]`` with True for real tokens;
    padded tokens are excluded from attention and from the mean pool. ``bert_base_config()`` gives the
    BERT-base sizes: ``TransformerEncoder(**bert_base_config())``.
    """

    def __init__(self, vocab: int = 1000, dim: int = 128, heads: int = 4, ffn: int = 512, layers: int = 2,
                 num_classes: int = 2, max_len: int = 128, dropout: float = 0.0, seq_len: int = 16) -> None:
        super().__init__()
        for name, v in (("vocab", vocab), ("dim", dim), ("heads", heads), ("ffn", ffn), ("layers", layers),
                        ("num_classes", num_classes), ("max_len", max_len), ("seq_len", seq_len)):
            check_positive_int(v, name)
        if seq_len > max_len:
            raise ValueError(f"seq_len must be <= max_len={max_len}, got {seq_len}")
        self.vocab, self.max_len, self.seq_len = vocab, max_len, seq_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.ln = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, seq] token ids, got shape {tuple(ids.shape)}")
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x = self.ln(self.embed(ids) + self.pos(torch.arange(t, device=ids.device)))
        for block in self.blocks:
            x = block(x, pad_mask)
        if pad_mask is None:
            pooled = x.mean(dim=1)
        else:
            w = pad_mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.fc(pooled)

    def example_input(self, batch: int = 2) -> Tensor:
        """Seeded token ids ``[batch, seq_len]`` in ``[0, vocab)``."""
        return torch.randint(0, self.vocab, (batch, self.seq_len), generator=torch.Generator().manual_seed(0))
