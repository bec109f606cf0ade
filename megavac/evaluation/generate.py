"""Batched beam search and greedy decoding for the encoder-decoder ``Transformer``.

The model has no incremental (KV) cache, so every step re-runs ``decode`` on the whole target
prefix: step t costs O(t) instead of O(1), i.e. O(L^2) per sentence. That is acceptable for
evaluation-sized sets; sentences are dropped from the batch as soon as they are finished so the
quadratic cost is paid only by the long ones.

Scores are summed log-probabilities; a finished hypothesis of ``n`` tokens (EOS included) is
ranked by ``score / n ** lenpen`` (fairseq's simple length normalisation, GNMT without the +5).

``lang`` (each sentence's language index in the model's training order) goes to the model's ``encode``
and ``decode`` when given: a model with family experts routes each row by it (and refuses to run without).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass
class SearchConfig:
    beam: int = 5
    """Hypotheses kept per sentence; 1 means greedy decoding."""
    lenpen: float = 1.0
    """Length penalty exponent: finished hypotheses are ranked by score / len**lenpen."""
    max_len_a: float = 1.2
    """Generate at most ``a * src_len + b`` tokens (EOS excluded) ..."""
    max_len_b: int = 10
    """... capped by the model's max_positions."""
    min_len: int = 1
    """EOS is forbidden before this many tokens have been generated."""
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 0

    def __post_init__(self):
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        if self.min_len < 0:
            raise ValueError(f"min_len must be >= 0, got {self.min_len}")


def max_lengths(src: torch.Tensor, cfg: SearchConfig, max_positions: int) -> torch.Tensor:
    """Per-sentence cap on generated tokens (EOS excluded), as a long tensor [B].

    ``src_len`` counts the real source tokens (tag and EOS included). The decoder input at the
    final step is BOS + max_len tokens, hence the ``max_positions - 1`` cap.
    """
    src_len = (src != cfg.pad_id).sum(1).double()
    n = torch.floor(cfg.max_len_a * src_len + cfg.max_len_b).long()
    return n.clamp(min=cfg.min_len, max=max_positions - 1)


def _lang_kw(lang) -> dict:
    """The ``lang`` keyword for the model's encode/decode: only when given (other models need not take it)."""
    return {} if lang is None else {"lang": lang}


def _next_lprobs(model, tokens, memory, src, step, max_len, cfg: SearchConfig, lang=None) -> torch.Tensor:
    """Log-probabilities [N, V] for the next token, with the decoding constraints applied."""
    logits = model.decode(tokens, memory, src, last_only=True, **_lang_kw(lang))[:, -1]
    lprobs = F.log_softmax(logits.float(), dim=-1)
    lprobs[:, cfg.pad_id] = NEG_INF
    lprobs[:, cfg.bos_id] = NEG_INF
    if step < cfg.min_len:
        lprobs[:, cfg.eos_id] = NEG_INF
    # Rows that reached their length cap may only end now.
    forced = step >= max_len
    if forced.any():
        eos_col = lprobs[:, cfg.eos_id].clone()
        lprobs[forced] = NEG_INF
        lprobs[forced, cfg.eos_id] = eos_col[forced].clamp(min=torch.finfo(lprobs.dtype).min)
    return lprobs


def greedy_search(model, src: torch.Tensor, cfg: SearchConfig, lang: torch.Tensor | None = None) -> list[list[int]]:
    """Arg-max decoding; a sentence stops at its first EOS (or its length cap). ``lang`` [B]: each
    sentence's language index (needed by a model with family experts)."""
    with torch.inference_mode():
        return _greedy(model, src, cfg, lang)


def beam_search(model, src: torch.Tensor, cfg: SearchConfig, lang: torch.Tensor | None = None) -> list[list[int]]:
    """Best hypothesis per sentence of a padded source batch ``src`` [B, S] (framed ids).

    Hypotheses are returned without BOS/EOS; ``cfg.beam == 1`` is plain greedy decoding. ``lang`` [B]:
    each sentence's language index (needed by a model with family experts).
    """
    with torch.inference_mode():
        return _greedy(model, src, cfg, lang) if cfg.beam == 1 else _beam(model, src, cfg, lang)


def _greedy(model, src, cfg, lang=None):
    B = src.shape[0]
    max_len = max_lengths(src, cfg, model.cfg.max_positions)
    memory = model.encode(src, **_lang_kw(lang))
    tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for step in range(int(max_len.max()) + 1):
        lprobs = _next_lprobs(model, tokens, memory, src, step, max_len, cfg, lang)
        nxt = lprobs.argmax(-1).masked_fill(done, cfg.pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == cfg.eos_id
        if done.all():
            break
    return [_strip(row[1:], cfg) for row in tokens.tolist()]


def _strip(ids: Sequence[int], cfg: SearchConfig) -> list[int]:
    """Tokens up to (excluding) the first EOS, without padding."""
    out = []
    for t in ids:
        if t == cfg.eos_id:
            break
        if t != cfg.pad_id:
            out.append(t)
    return out


def _live_bound(scores, step, max_len, lenpen):
    """Best normalised score any live beam can still reach, per sentence [N].

    Cumulative log-probs only decrease, so a live beam's final score is <= its current one; the
    normalised score is then maximised at the shortest or longest allowed final length.
    """
    best = scores.max(1).values
    shortest = torch.full_like(best, float(step + 2))
    longest = (max_len + 1).to(best.dtype)
    return torch.maximum(best / shortest**lenpen, best / longest**lenpen)


def _beam(model, src, cfg, lang=None):
    B, K, dev = src.shape[0], cfg.beam, src.device
    max_len = max_lengths(src, cfg, model.cfg.max_positions)
    cap = int(max_len.max()) + 1  # longest finished hypothesis, EOS included

    # Finished hypotheses: the K best per sentence, as normalised scores and padded tokens.
    fin_scores = torch.full((B, K), NEG_INF, device=dev)
    fin_tokens = torch.full((B, K, cap), cfg.pad_id, dtype=torch.long, device=dev)

    # Live beams of the still-active sentences; `alive` maps active rows to batch rows.
    alive = torch.arange(B, device=dev)
    src_k = src.repeat_interleave(K, 0)
    lang_k = None if lang is None else lang.repeat_interleave(K, 0)
    memory = model.encode(src, **_lang_kw(lang)).repeat_interleave(K, 0)
    tokens = torch.full((B * K, 1), cfg.bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, K), NEG_INF, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first one

    for step in range(cap):
        N = alive.numel()
        lprobs = _next_lprobs(model, tokens, memory, src_k, step, max_len[alive].repeat_interleave(K), cfg, lang_k)
        V = lprobs.shape[-1]
        cand = (scores[:, :, None] + lprobs.view(N, K, V)).view(N, K * V)
        # 2K candidates guarantee K non-EOS continuations even if K of them end.
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)
        top_beam, top_tok = top_idx // V, top_idx % V
        prefixes = tokens.view(N, K, -1)
        is_eos = top_tok == cfg.eos_id

        # Finalise EOS candidates ranked within the top K (as fairseq does).
        new_fin = torch.where(is_eos[:, :K], top_scores[:, :K] / float(step + 1) ** cfg.lenpen, NEG_INF)
        ended = _gather_beams(prefixes, top_beam[:, :K])[:, :, 1:]  # drop BOS
        ended = torch.cat([ended, torch.full((N, K, 1), cfg.eos_id, dtype=torch.long, device=dev)], 2)
        ended = F.pad(ended, (0, cap - ended.shape[2]), value=cfg.pad_id)
        merged_s = torch.cat([fin_scores[alive], new_fin], 1)
        merged_t = torch.cat([fin_tokens[alive], ended], 1)
        keep_s, keep_i = merged_s.topk(K, dim=1)
        fin_scores[alive] = keep_s
        fin_tokens[alive] = merged_t.gather(1, keep_i[:, :, None].expand(-1, -1, cap))

        # Live beams: the first K non-EOS candidates in rank order.
        rank = is_eos.long() * top_idx.shape[1] + torch.arange(top_idx.shape[1], device=dev)
        pick = rank.topk(K, dim=1, largest=False).values % top_idx.shape[1]
        scores = top_scores.gather(1, pick)
        beam_src = top_beam.gather(1, pick)
        new_tok = top_tok.gather(1, pick)
        tokens = torch.cat([_gather_beams(prefixes, beam_src), new_tok[:, :, None]], 2).view(N * K, -1)

        # A sentence is done when K hypotheses are finished and no live beam can beat the worst.
        full = torch.isfinite(fin_scores[alive]).all(1)
        beaten = fin_scores[alive].min(1).values >= _live_bound(scores, step, max_len[alive], cfg.lenpen)
        done = (full & beaten) | (step >= max_len[alive])
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            rows = (keep[:, None] * K + torch.arange(K, device=dev)).view(-1)
            alive, scores = alive[keep], scores[keep]
            tokens, memory, src_k = tokens[rows], memory[rows], src_k[rows]
            lang_k = None if lang_k is None else lang_k[rows]

    best = fin_scores.argmax(1)
    return [_strip(row, cfg) for row in fin_tokens[torch.arange(B, device=dev), best].tolist()]


def _gather_beams(prefixes: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
    """prefixes [N, K, T] indexed by beam_idx [N, M] -> [N, M, T]."""
    return prefixes.gather(1, beam_idx[:, :, None].expand(-1, -1, prefixes.shape[2]))


def length_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of at most ``max_tokens`` padded source tokens (and at most
    ``max_sentences`` sentences, when given).

    Longest sentences come first, so an out-of-memory error shows up at once rather than at the
    end; a single sentence longer than ``max_tokens`` gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        # Sorted descending, so the batch's first sentence is its longest.
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > max_tokens or (max_sentences is not None and len(cur) >= max_sentences)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def translate(
    model,
    sources: Sequence[Sequence[int]],
    cfg: SearchConfig | None = None,
    max_tokens: int = 4000,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
    max_sentences: int | None = None,
    lang: int | Sequence[int] | None = None,
) -> list[list[int]]:
    """Decode encoder inputs (already framed by ``tokens.source_ids``), in their original order.

    Sentences are sorted by length into batches of ``max_tokens`` source tokens (padding
    included; the beam multiplies the real work by ``beam``) and at most ``max_sentences``
    sentences. ``progress(n)`` is called after each batch with the number of sentences it held.
    ``lang``: the language index (in the model's training order) of all sources, or of each; a model
    with family experts needs it to route the rows.
    """
    cfg = cfg or SearchConfig()
    max_pos = model.cfg.max_positions
    for i, s in enumerate(sources):
        if len(s) == 0 or len(s) > max_pos:
            raise ValueError(f"source {i} has {len(s)} tokens; expected 1..max_positions={max_pos}")
    langs = None
    if lang is not None:
        lang = lang.tolist() if isinstance(lang, torch.Tensor) else lang
        langs = [int(k) for k in lang] if isinstance(lang, (list, tuple)) else [int(lang)] * len(sources)
        if len(langs) != len(sources):
            raise ValueError(f"{len(langs)} language indices for {len(sources)} sources")
    was_training = model.training
    model.eval()
    out: list[list[int] | None] = [None] * len(sources)
    try:
        for idx in length_batches([len(s) for s in sources], max_tokens, max_sentences):
            src = _pad([sources[i] for i in idx], cfg.pad_id, device)
            batch_lang = None if langs is None else torch.tensor([langs[i] for i in idx], dtype=torch.long,
                                                                 device=src.device)
            for i, hyp in zip(idx, beam_search(model, src, cfg, batch_lang)):
                out[i] = hyp
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    return out


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    batch = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        batch[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return batch.to(device)
