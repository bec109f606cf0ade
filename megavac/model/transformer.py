"""Transformer encoder-decoder for multilingual NMT (architecture only).

Shared source/target vocabulary, tied input embeddings and output projection, pre-LN by
default, attention through ``torch.nn.functional.scaled_dot_product_attention``.
The target language is chosen by a ``<2xx>`` tag that the data layer prepends to the source.

Two ablations of the CATS paper are options of ``ModelConfig``:

* ``layernorm_affine=False``: every LayerNorm normalises without a gain or bias (no LayerNorm parameters).
* ``expert_modules``: family experts, one copy per language family of the feed-forward blocks (``ffn``),
  the attention blocks (``attn``, self and cross) and/or the output projection (``output``, an untied
  ``Linear(d_model, vocab)`` per family, initialised from the tied embedding, which stays the input
  embedding). Routing is deterministic: each row goes through the copy of its language's family
  (``families``: family index per language index), so ``forward``/``encode``/``decode`` then need ``lang``,
  the language index of each row. With gradients enabled every copy runs on all rows and a row mask picks
  each row's output (``FamilyExperts``): a copy's parameters then receive exactly zero gradient from the
  rows of other families, so the per-language gradient collectors need no change and ZeRO-3 gathers the
  same parameters on every rank; the cost is F× the routed modules' compute (and activations) in training.
  Without gradients (search, evaluation) each row runs through its own family's copy only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

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
    layernorm_affine: bool = True
    """LayerNorm gains and biases; False: every LayerNorm normalises only (no LayerNorm parameters)."""
    expert_modules: str = ""
    """Family experts: comma-separated subset of ffn, attn, output (one copy of those modules per language
    family, each row routed by its language); empty: none. Kept in EXPERT_MODULES order."""
    families: list[int] | None = None
    """Family index of each language index (the training language order); required with expert_modules."""
    family_names: list[str] | None = None
    """Name of each family index."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        self.expert_modules = ",".join(parse_expert_modules(self.expert_modules))
        if self.expert_modules:
            if not self.families or not self.family_names:
                raise ValueError(f"expert_modules={self.expert_modules!r} needs families (the family index of each "
                                 "language) and family_names")
            bad = [f for f in self.families if not (isinstance(f, int) and 0 <= f < len(self.family_names))]
            if bad:
                raise ValueError(f"families holds {bad}, not indices of family_names {self.family_names}")
        if self.families is not None:
            self.families = [int(f) for f in self.families]
        if self.family_names is not None:
            self.family_names = [str(n) for n in self.family_names]

    @property
    def experts(self) -> tuple[str, ...]:
        """The modules with one copy per family (empty: none)."""
        return tuple(m for m in self.expert_modules.split(",") if m)

    @property
    def num_families(self) -> int:
        return len(self.family_names) if self.experts else 0

    def to_dict(self) -> dict:
        """The fields as a dict. The ablation fields appear only when they differ from their defaults, so a
        default model's dict (megavac.json, the settings compared on --resume) is what it was before they
        existed; ``ModelConfig(**d)`` restores either form."""
        d = asdict(self)
        for f in fields(self):
            if f.name in _ABLATION_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d


EXPERT_MODULES = ("ffn", "attn", "output")
_ABLATION_FIELDS = ("layernorm_affine", "expert_modules", "families", "family_names")


def parse_expert_modules(text: str | None) -> tuple[str, ...]:
    """The expert modules of a comma-separated list (``--family-experts``), in EXPERT_MODULES order;
    ValueError naming an unknown or repeated one."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERT_MODULES]
    if unknown:
        raise ValueError(f"--family-experts: unknown module(s) {unknown}; choose from {', '.join(EXPERT_MODULES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--family-experts names {repeated} more than once")
    return tuple(m for m in EXPERT_MODULES if m in names)


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


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    """A LayerNorm over d_model, with a gain and bias unless ``cfg.layernorm_affine`` is False."""
    return nn.LayerNorm(cfg.d_model, elementwise_affine=cfg.layernorm_affine)


class Route:
    """Which family's expert each row of a batch goes through: ``family`` long [B]. Built once per
    forward (``Transformer.route``) and handed to every ``FamilyExperts``."""

    def __init__(self, family: torch.Tensor, num_families: int):
        self.family, self.num_families = family, num_families
        self._groups, self._masks = None, {}

    def mask(self, f: int, ndim: int) -> torch.Tensor:
        """bool [B, 1, ...] (``ndim`` dimensions): the rows of family ``f``."""
        if (f, ndim) not in self._masks:
            self._masks[f, ndim] = (self.family == f).view(-1, *([1] * (ndim - 1)))
        return self._masks[f, ndim]

    def groups(self) -> list[tuple[int, torch.Tensor | None]]:
        """(family, its row indices) for each family with rows; indices None when it has all of them.
        Reads the routing back to the host once (inference only)."""
        if self._groups is None:
            counts = torch.bincount(self.family, minlength=self.num_families).tolist()
            B = self.family.shape[0]
            self._groups = [(f, None if n == B else torch.nonzero(self.family == f).flatten())
                            for f, n in enumerate(counts) if n]
        return self._groups


class FamilyExperts(nn.Module):
    """One copy of a module per language family; each row's output is its family's copy's.

    With gradients enabled (training) every copy runs on all rows and ``torch.where`` keeps each row's own
    (out = Σ_f mask_f · expert_f(x), without 0·inf): a copy's parameters get exactly zero gradient through
    the rows of other families, the per-language gradient collectors see ordinary Linear layers on the
    whole batch, and every rank runs the same modules (ZeRO-3 gathers collectively). Without gradients
    each family's rows go through its copy only (families without rows are skipped), except under ZeRO-3,
    whose parameter gathering needs every rank to run the same modules.
    """

    def __init__(self, make, num_families: int):
        super().__init__()
        self.experts = nn.ModuleList(make() for _ in range(num_families))

    def forward(self, x, *args, route: Route | None = None, **kw):
        if route is None:
            raise ValueError("this model has family experts: pass lang (the language index of each row) to its "
                             "forward, encode and decode")
        if not torch.is_grad_enabled() and not self._zero3():
            return self._inference(route, x, *args, **kw)
        out = None
        for f, expert in enumerate(self.experts):
            y = expert(x, *args, **kw)
            out = y if out is None else torch.where(route.mask(f, y.dim()), y, out)
        return out

    def _zero3(self) -> bool:
        return any(hasattr(p, "ds_id") for p in self.experts[0].parameters())

    def _inference(self, route: Route, x, *args, **kw):
        groups = route.groups()
        if len(groups) == 1 and groups[0][1] is None:
            return self.experts[groups[0][0]](x, *args, **kw)
        B, out = x.shape[0], None
        for f, rows in groups:
            sub = [a.index_select(0, rows) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == B else a
                   for a in args]
            y = self.experts[f](x.index_select(0, rows), *sub, **kw)
            if out is None:
                out = y.new_empty(B, *y.shape[1:])
            out[rows] = y
        return out


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
        self.fn, self.norm, self.pre = fn, layer_norm(cfg), cfg.pre_ln
        self.drop = nn.Dropout(cfg.dropout)
        self.routed = isinstance(fn, FamilyExperts)

    def forward(self, x, *args, route: Route | None = None, **kw):
        if self.routed:
            kw["route"] = route
        if self.pre:
            return x + self.drop(self.fn(self.norm(x), *args, **kw))
        return self.norm(x + self.drop(self.fn(x, *args, **kw)))


class SelfAttention(Attention):
    def forward(self, x, mask=None, causal=False):
        return super().forward(x, x, mask, causal)


def routed(cfg: ModelConfig, kind: str, make) -> nn.Module:
    """``make()``, or a ``FamilyExperts`` of one per family when ``kind`` is one of cfg's expert modules."""
    return FamilyExperts(make, cfg.num_families) if kind in cfg.experts else make()


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Sublayer(cfg, routed(cfg, "attn", lambda: SelfAttention(cfg)))
        self.ffn = Sublayer(cfg, routed(cfg, "ffn", lambda: FeedForward(cfg)))

    def forward(self, x, src_mask, route: Route | None = None):
        return self.ffn(self.attn(x, src_mask, route=route), route=route)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Sublayer(cfg, routed(cfg, "attn", lambda: SelfAttention(cfg)))
        self.cross_attn = Sublayer(cfg, routed(cfg, "attn", lambda: Attention(cfg)))
        self.ffn = Sublayer(cfg, routed(cfg, "ffn", lambda: FeedForward(cfg)))

    def forward(self, y, memory, src_mask, route: Route | None = None):
        y = self.self_attn(y, causal=True, route=route)
        return self.ffn(self.cross_attn(y, memory, src_mask, route=route), route=route)


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
        self.enc_norm = layer_norm(cfg) if cfg.pre_ln else nn.Identity()
        self.dec_norm = layer_norm(cfg) if cfg.pre_ln else nn.Identity()
        if cfg.experts:
            # Family index of each language index; not saved (the config holds it).
            self.register_buffer("lang_family", torch.tensor(cfg.families, dtype=torch.long), persistent=False)
        if "output" in cfg.experts:
            # Untied per-family output projections, each starting as the tied one (the embedding).
            self.output = FamilyExperts(lambda: nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), cfg.num_families)
            with torch.no_grad():
                for expert in self.output.experts:
                    expert.weight.copy_(self.embed.weight)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self, tokens)

    def key_mask(self, src: torch.Tensor) -> torch.Tensor:
        return key_mask(src, self.cfg.pad_id)

    def route(self, lang: torch.Tensor | None, rows: int) -> Route | None:
        """The family routing of a batch of ``rows`` rows whose language indices are ``lang`` [rows]
        (None for a model without family experts, which ignores ``lang``)."""
        if not self.cfg.experts:
            return None
        if lang is None:
            raise ValueError(f"this model has family experts ({self.cfg.expert_modules}): pass lang, the language "
                             "index of each row (training order), to forward, encode and decode")
        if not isinstance(lang, torch.Tensor) or lang.shape != (rows,) or lang.dtype not in (torch.long, torch.int):
            raise ValueError(f"lang must be an integer tensor of shape [{rows}] (one language index per row), got "
                             f"{tuple(lang.shape) if isinstance(lang, torch.Tensor) else type(lang).__name__}")
        return Route(self.lang_family[lang.to(self.lang_family.device)], self.cfg.num_families)

    def encode(self, src: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode(src, self.route(lang, src.shape[0]))

    def _encode(self, src, route):
        x, mask = self.embed_tokens(src), self.key_mask(src)
        for layer in self.encoder:
            x = layer(x, mask, route=route)
        return self.enc_norm(x)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src: torch.Tensor, last_only: bool = False,
               lang: torch.Tensor | None = None):
        """Logits [B, T, V] for every target position (causal; padding sits after real tokens).

        ``last_only`` projects just the final position ([B, 1, V]): search needs one row, and the
        [B, T, V] projection would dominate a decoding step's time with a large vocabulary. ``lang``:
        each row's language index (needed with family experts).
        """
        return self._decode(tgt_in, memory, src, last_only, self.route(lang, tgt_in.shape[0]))

    def _decode(self, tgt_in, memory, src, last_only, route):
        y, mask = self.embed_tokens(tgt_in), self.key_mask(src)
        for layer in self.decoder:
            y = layer(y, memory, mask, route=route)
        y = self.dec_norm(y[:, -1:] if last_only else y)
        return self.output(y, route=route) if "output" in self.cfg.experts else self.project(y)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Tied output projection: logits = y Eᵀ with the token embedding E (unused with output experts)."""
        return F.linear(y, self.embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]; ``lang`` [B]: each row's language index (needed with family experts)."""
        route = self.route(lang, src.shape[0])
        return self._decode(tgt_in, self._encode(src, route), src, False, route)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def expert_parameters(self) -> int:
        """Parameters inside family experts (all copies)."""
        return sum(p.numel() for m in self.modules() if isinstance(m, FamilyExperts) for p in m.parameters())
