"""Transformer encoder-decoder for multilingual NMT (architecture only).

Shared source/target vocabulary, tied input embeddings and output projection, pre-LN by
default, attention through ``torch.nn.functional.scaled_dot_product_attention``.
The target language is chosen by a ``<2xx>`` tag that the data layer prepends to the source.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    """Size of the joint SentencePiece vocabulary (shared by source and target)."""
    d_model: int = 512
    """Width of embeddings and residual stream."""
    n_heads: int = 8
    """Attention heads; must divide d_model."""
    enc_layers: int = 6
    """Number of encoder layers."""
    dec_layers: int = 6
    """Number of decoder layers."""
    d_ff: int = 2048
    """Hidden width of the feed-forward blocks."""
    dropout: float = 0.1
    """Dropout on embeddings, residual branches and FFN activations."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities."""
    pre_ln: bool = True
    """Pre-LayerNorm (stable for deep multilingual models); False gives the original post-LN."""
    max_positions: int = 1024
    """Longest sequence the sinusoidal position table covers."""
    pad_id: int = 0
    """Padding token id (SentencePiece is trained with pad=0)."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes. "big" is Transformer-big (Vaswani et al. 2017); "base" the 6+6 layer base model.
PRESETS = {
    "tiny": dict(d_model=64, n_heads=4, enc_layers=2, dec_layers=2, d_ff=256),
    "mini": dict(d_model=128, n_heads=4, enc_layers=2, dec_layers=2, d_ff=512),
    "small": dict(d_model=256, n_heads=4, enc_layers=3, dec_layers=3, d_ff=1024),
    "base": dict(d_model=512, n_heads=8, enc_layers=6, dec_layers=6, d_ff=2048),
    "big": dict(d_model=1024, n_heads=16, enc_layers=6, dec_layers=6, d_ff=4096, dropout=0.3),
}


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.p = cfg.attn_dropout

    def forward(self, x, mem, mask=None, causal=False):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.h, D // self.h).transpose(1, 2)
        k, v = self.kv(mem).view(B, mem.shape[1], 2, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.p if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class Sublayer(nn.Module):
    """Residual wrapper: pre-LN ``x + f(LN(x))`` or post-LN ``LN(x + f(x))``."""

    def __init__(self, cfg: ModelConfig, fn: nn.Module):
        super().__init__()
        self.fn, self.norm, self.pre = fn, nn.LayerNorm(cfg.d_model), cfg.pre_ln
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, *args, **kw):
        if self.pre:
            return x + self.drop(self.fn(self.norm(x), *args, **kw))
        return self.norm(x + self.drop(self.fn(x, *args, **kw)))


class SelfAttention(Attention):
    def forward(self, x, mask=None, causal=False):
        return super().forward(x, x, mask, causal)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Sublayer(cfg, SelfAttention(cfg))
        self.ffn = Sublayer(cfg, FeedForward(cfg))

    def forward(self, x, src_mask):
        return self.ffn(self.attn(x, src_mask))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Sublayer(cfg, SelfAttention(cfg))
        self.cross_attn = Sublayer(cfg, Attention(cfg))
        self.ffn = Sublayer(cfg, FeedForward(cfg))

    def forward(self, y, memory, src_mask):
        y = self.self_attn(y, causal=True)
        return self.ffn(self.cross_attn(y, memory, src_mask))


def init_embedding(module: nn.Module, cfg: ModelConfig) -> None:
    """Give ``module`` the shared token embedding, the position table and the embedding dropout."""
    module.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
    nn.init.normal_(module.embed.weight, std=cfg.d_model**-0.5)
    with torch.no_grad():
        module.embed.weight[cfg.pad_id].zero_()
    module.register_buffer("pos", sinusoidal_table(cfg.max_positions, cfg.d_model), persistent=False)
    module.drop = nn.Dropout(cfg.dropout)


def embed_tokens(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Scaled token embedding plus sinusoidal positions, with dropout (``module`` from ``init_embedding``)."""
    cfg, T = module.cfg, tokens.shape[1]
    if T > cfg.max_positions:
        raise ValueError(f"sequence of {T} tokens exceeds max_positions={cfg.max_positions}")
    x = module.embed(tokens) * math.sqrt(cfg.d_model) + module.pos[:T].to(module.embed.weight.dtype)
    return module.drop(x)


def key_mask(src: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Boolean [B, 1, 1, S] mask, True where a key may be attended."""
    return (src != pad_id)[:, None, None, :]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        init_embedding(self, cfg)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        # Pre-LN stacks need a final norm; post-LN layers already end normalised.
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else nn.Identity()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self, tokens)

    def key_mask(self, src: torch.Tensor) -> torch.Tensor:
        return key_mask(src, self.cfg.pad_id)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        x, mask = self.embed_tokens(src), self.key_mask(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src: torch.Tensor, last_only: bool = False):
        """Logits [B, T, V] for every target position (causal; padding sits after real tokens).

        ``last_only`` projects just the final position ([B, 1, V]): search needs one row, and the
        [B, T, V] projection would dominate a decoding step's time with a large vocabulary.
        """
        y, mask = self.embed_tokens(tgt_in), self.key_mask(src)
        for layer in self.decoder:
            y = layer(y, memory, mask)
        return self.project(self.dec_norm(y[:, -1:] if last_only else y))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Tied output projection: logits = y Eᵀ with the token embedding E."""
        return F.linear(y, self.embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src), src)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
