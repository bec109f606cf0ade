"""Runtime data: memory-mapped multilingual datasets, temperature sampler, language-grouped batches.

A *language* is one translation direction (``en-de``; the papers call it a task); its index k is the
k of the per-language losses and gradients. Batches are token-budgeted and their rows are grouped by language,
so row ranges ``segments[k]`` say which rows belong to which language.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megavac.tokens import source_ids, target_ids


class MultilingualDataset:
    """All languages of one split of a prepared data directory, memory-mapped."""

    def __init__(self, data_dir: str, split: str, langs: str | list[str] | None = None):
        """``langs``: names (list or comma-separated, as ``--langs``) in language-index order; None = all."""
        from data_pipeline.indexed import load_meta, open_split, select_langs

        self.meta = load_meta(data_dir)
        self.split = split
        self.pad_id, self.bos_id, self.eos_id = self.meta["pad_id"], self.meta["bos_id"], self.meta["eos_id"]
        self.langs = select_langs(self.meta, langs, data_dir)
        self.names = [t["name"] for t in self.langs]
        self.src, self.tgt, self.src_len, self.tgt_len = [], [], [], []
        for t in self.langs:
            src = open_split(data_dir, t["pair"], split, t["src"])
            tgt = open_split(data_dir, t["pair"], split, t["tgt"])
            assert len(src) == len(tgt), f"{t['name']} {split}: {len(src)} vs {len(tgt)} lines"
            self.src.append(src)
            self.tgt.append(tgt)
            self.src_len.append(np.asarray(src.sizes, dtype=np.int64) + 2)  # tag + eos
            self.tgt_len.append(np.asarray(tgt.sizes, dtype=np.int64) + 1)  # bos or eos
        self.sizes = np.array([len(s) for s in self.src], dtype=np.int64)

    @property
    def num_langs(self) -> int:
        return len(self.langs)

    def example_len(self, k: int, idx: np.ndarray) -> np.ndarray:
        return np.maximum(self.src_len[k][idx], self.tgt_len[k][idx])

    def example(self, k: int, i: int):
        src = source_ids(self.langs[k]["tag_id"], self.src[k][i], self.eos_id)
        tgt_in, tgt_out = target_ids(self.tgt[k][i], self.bos_id, self.eos_id)
        return src, tgt_in, tgt_out


@dataclass
class Batch:
    src: torch.Tensor  # [B, S]
    tgt_in: torch.Tensor  # [B, T]
    tgt_out: torch.Tensor  # [B, T]
    lang: torch.Tensor  # [B] language index of each row; rows are grouped by language
    segments: dict  # language index -> (first row, end row)
    ntokens: int  # target tokens (what the loss is averaged over)

    def language_rows(self, k: int, pad_id: int) -> "Batch":
        """Language k's rows alone, trimmed to their longest sequences; ``ntokens`` stays the whole
        batch's count, the normaliser of every language's loss share."""
        a, b = self.segments[k]
        src, tgt_in, tgt_out = self.src[a:b], self.tgt_in[a:b], self.tgt_out[a:b]
        S = int((src != pad_id).sum(1).max())
        T = int(((tgt_in != pad_id) | (tgt_out != pad_id)).sum(1).max())
        return Batch(src[:, :S], tgt_in[:, :T], tgt_out[:, :T], self.lang[a:b], {k: (0, b - a)}, self.ntokens)

    def to(self, device):
        for f in ("src", "tgt_in", "tgt_out", "lang"):
            setattr(self, f, getattr(self, f).to(device, non_blocking=True))
        return self


def collate(ds: MultilingualDataset, items: list[tuple[int, int]], max_positions: int) -> Batch:
    """Pad a list of (language, index) into a batch whose rows are grouped by language."""
    items = sorted(items, key=lambda ki: ki[0])  # stable: keeps the sampler's order within a language
    exs = [ds.example(k, i) for k, i in items]
    longest = max(max(len(s), len(t)) for s, t, _ in exs)
    if longest > max_positions:
        k, i = items[max(range(len(exs)), key=lambda r: max(len(exs[r][0]), len(exs[r][1])))]
        raise ValueError(
            f"{ds.names[k]} {ds.split} line {i + 1} has {longest} tokens > max_positions={max_positions}; "
            "lower the prepare --max-len filter or raise the model's max_positions"
        )
    S, T = max(len(e[0]) for e in exs), max(len(e[1]) for e in exs)
    src = torch.full((len(exs), S), ds.pad_id, dtype=torch.long)
    tgt_in = torch.full((len(exs), T), ds.pad_id, dtype=torch.long)
    tgt_out = torch.full((len(exs), T), ds.pad_id, dtype=torch.long)
    for r, (s, ti, to) in enumerate(exs):
        src[r, : len(s)] = torch.from_numpy(s)
        tgt_in[r, : len(ti)] = torch.from_numpy(ti)
        tgt_out[r, : len(to)] = torch.from_numpy(to)
    lang = torch.tensor([k for k, _ in items], dtype=torch.long)
    segments = {}
    for r, (k, _) in enumerate(items):
        first, _ = segments.get(k, (r, r))
        segments[k] = (first, r + 1)
    return Batch(src, tgt_in, tgt_out, lang, segments, int((tgt_out != ds.pad_id).sum()))


def sampling_probs(sizes, temperature: float = 5.0, weights=None) -> np.ndarray:
    """p_i ∝ (n_i / Σn)^(1/T); T=1 proportional, T=inf uniform; explicit ``weights`` override."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != sizes.shape or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"explicit sampling weights {w.tolist()} must be {len(sizes)} finite values >= 0, not all 0")
        return w / w.sum()
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0 (or inf), got {temperature}")
    if (sizes <= 0).any():
        raise ValueError(f"every language needs training data; sizes are {sizes.astype(int).tolist()}")
    p = (sizes / sizes.sum()) ** (0.0 if math.isinf(temperature) else 1.0 / temperature)
    return p / p.sum()


def pack_by_length(items: list, lens: np.ndarray, max_tokens: int, key: np.ndarray | None = None) -> list[list]:
    """Sort items by length (or by ``key``) and cut them into batches of at most ``max_tokens`` padded tokens."""
    batches, cur, cur_max = [], [], 0
    for j in np.argsort(lens if key is None else key, kind="stable"):
        n = int(lens[j])
        if cur and max(cur_max, n) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(items[j])
        cur_max = max(cur_max, n)
    return batches + [cur] if cur else batches


def pack_by_language(items: list[tuple[int, int]], lens: np.ndarray, max_tokens: int) -> list[list]:
    """Pack (language, index) items into batches that each hold one language, bar a few mixed ones.

    Each language is packed alone with ``pack_by_length``. Its last batch (its longest items) is kept
    only if it fills at least half the budget (padded tokens * 2 >= ``max_tokens``); the short ones of all
    languages are packed together, ordered by (language, length), so each mixed batch spans a run of
    consecutive languages and the fewest the budget allows, without a language being left a stub batch.
    """
    lens = np.asarray(lens, dtype=np.int64)
    langs = np.array([k for k, _ in items], dtype=np.int64)
    batches, rest = [], []
    for k in np.unique(langs):
        sel = np.flatnonzero(langs == k)
        own = pack_by_length(list(sel), lens[sel], max_tokens)  # positions into items
        if 2 * int(lens[own[-1]].max()) * len(own[-1]) < max_tokens:
            rest += own.pop()
        batches += own
    if rest:
        rest = np.asarray(rest)
        batches += pack_by_length(list(rest), lens[rest], max_tokens, key=langs[rest] * (lens.max() + 1) + lens[rest])
    return [[items[j] for j in b] for b in batches]


class TemperatureSampler:
    """Endless stream of token-budgeted, language-grouped micro-batches, disjoint across ranks.

    Every rank runs the same generator from the same seed. Examples are drawn in *pools*: a language
    from p, then that language's next index in a per-language, per-epoch permutation; a pool is sorted by
    length, cut into batches of at most ``max_tokens`` (padded) tokens, shuffled, and dealt out
    round-robin (rank r takes batches r, r+W, ...). Length-sorting inside a pool keeps padding low
    without changing the sampling distribution.

    ``lang_affine=True`` draws each pool the same way (the same sampling probabilities; the first pool's
    items are identical) but packs each language on its own (``pack_by_language``): nearly every micro-batch then holds one language, so a
    language's gradient lives on the ranks that hold it; only each language's short last batch is pooled into
    a few mixed batches. It changes the stream, so a resumed run must use the same setting.

    The state is small: the RNG state and per-language cursors at the start of the current pool plus the
    position in it. Resuming regenerates that pool and skips to the position, so the data order is
    exactly that of an uninterrupted run.
    """

    def __init__(self, lengths: list[np.ndarray], probs: np.ndarray, max_tokens: int, seed: int,
                 rank: int = 0, world: int = 1, pool_batches: int = 64, langs_per_batch: int = 0,
                 lang_affine: bool = False):
        self.lengths, self.probs = lengths, np.asarray(probs, dtype=np.float64)
        self.max_tokens, self.seed, self.rank, self.world = max_tokens, seed, rank, world
        self.pool_batches, self.lang_affine = pool_batches, bool(lang_affine)
        # CATS trains each batch on a few languages: draw that many (without replacement, by p) per pool.
        self.langs_per_batch = langs_per_batch
        if langs_per_batch and not 0 < langs_per_batch <= int((self.probs > 0).sum()):
            raise ValueError(f"langs_per_batch={langs_per_batch} must be between 1 and the {int((self.probs > 0).sum())} "
                             "languages with non-zero sampling probability")
        longest = max(int(x.max()) for x in lengths if len(x))
        if longest > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is smaller than the longest training example ({longest} tokens)")
        self.rng = np.random.default_rng(seed)
        self.epoch = np.zeros(len(lengths), dtype=np.int64)
        self.cursor = np.zeros(len(lengths), dtype=np.int64)
        self.counts = np.zeros(len(lengths), dtype=np.int64)  # sentences this rank has consumed per language
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self._pool: list[list[tuple[int, int]]] = []
        self._pos = 0
        self._pool_start = None

    def _permutation(self, k: int) -> np.ndarray:
        ep = int(self.epoch[k])
        if k not in self._perm or self._perm[k][0] != ep:
            rng = np.random.default_rng([self.seed, 7919 + k, ep])
            self._perm[k] = (ep, rng.permutation(len(self.lengths[k])).astype(np.int32))
        return self._perm[k][1]

    def _take(self, k: int) -> int:
        if self.cursor[k] >= len(self.lengths[k]):
            self.epoch[k] += 1
            self.cursor[k] = 0
        i = int(self._permutation(k)[self.cursor[k]])
        self.cursor[k] += 1
        return i

    def _fill_pool(self, pool_world: int | None = None, offset: int = 0):
        """Draw the next pool. ``pool_world``/``offset`` regenerate a pool drawn by a run with another
        data-parallel size and deal only its batches from ``offset`` on (resharded resume)."""
        pool_world = pool_world or self.world
        self._pool_start = {"rng": self.rng.bit_generator.state, "epoch": self.epoch.copy(),
                            "cursor": self.cursor.copy(), "world": pool_world, "offset": offset}
        budget = self.pool_batches * pool_world * self.max_tokens
        p = self.probs
        if self.langs_per_batch:
            chosen = self.rng.choice(len(p), size=self.langs_per_batch, replace=False, p=p)
            p = np.zeros_like(p)
            p[chosen] = self.probs[chosen] / self.probs[chosen].sum()
        items, lens, total = [], [], 0
        while total < budget:
            for k in self.rng.choice(len(p), size=256, p=p):
                i = self._take(int(k))
                n = int(self.lengths[k][i])
                items.append((int(k), i))
                lens.append(n)
                total += n
                if total >= budget:
                    break
        pack = pack_by_language if self.lang_affine else pack_by_length
        batches = pack(items, np.asarray(lens), self.max_tokens)
        perm = self.rng.permutation(len(batches))
        batches = [batches[p] for p in perm]
        # Whole rounds only, so every rank gets the same number of micro-batches per pool.
        batches = batches[: len(batches) // pool_world * pool_world][offset:]
        self._cut = len(batches) % self.world  # batches that do not fill a last round (resharded resume only)
        self._pool = batches[: len(batches) - self._cut]
        self._pos = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[tuple[int, int]]:
        if self._pos >= len(self._pool) // self.world:
            self._fill_pool()
        batch = self._pool[self._pos * self.world + self.rank]
        self._pos += 1
        for k, _ in batch:
            self.counts[k] += 1
        return batch

    def realised_ratios(self) -> np.ndarray:
        return self.counts / max(1, self.counts.sum())

    def state_dict(self) -> dict:
        start = self._pool_start
        return {"seed": self.seed, "world": self.world, "rank": self.rank, "lang_affine": self.lang_affine,
                "pos": self._pos, "counts": self.counts.tolist(),
                "pool_start": None if start is None else
                {"rng": start["rng"], "epoch": start["epoch"].tolist(), "cursor": start["cursor"].tolist(),
                 "world": start["world"], "offset": start["offset"]}}

    def _check_compatible(self, state: dict):
        saved = bool(state.get("lang_affine", False))  # states saved before the option existed: off
        if saved != self.lang_affine:
            raise ValueError(f"sampler state was saved with lang_affine={saved}, this run has "
                             f"lang_affine={self.lang_affine}; exact resume needs the same batching")
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed={state['seed']}, this run has seed={self.seed}")

    def _restart_pool(self, start: dict, offset: int = 0):
        self.rng.bit_generator.state = start["rng"]
        self.epoch = np.asarray(start["epoch"], dtype=np.int64)
        self.cursor = np.asarray(start["cursor"], dtype=np.int64)
        self._fill_pool(start.get("world", self.world), start.get("offset", 0) + offset)

    def load_state_dict(self, state: dict):
        """Exact resume: the same data-parallel size, this rank's own state."""
        if state["world"] != self.world:
            raise ValueError(f"sampler state was saved with world={state['world']}, this run has world={self.world}; "
                             "use load_resharded for another data-parallel size")
        self._check_compatible(state)
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        if state["pool_start"] is None:
            return
        self._restart_pool(state["pool_start"])
        self._pos = state["pos"]

    def load_resharded(self, states: list[dict]) -> int:
        """Resume from the states of every data-parallel rank of a run with another data-parallel size.

        The pool being consumed is regenerated as that run drew it; the batches its ranks had not taken yet
        are dealt out again to this run's ranks, in the same order, and fewer than ``world`` of them (those
        that do not fill a last round) are dropped. No sample is repeated; the dropped batches are the only
        ones skipped. Per-language counts (the realised sampling ratios) are carried over on rank 0.
        Returns the number of dropped batches.
        """
        old_world = states[0]["world"]
        if sorted(s.get("rank", -1) for s in states) != list(range(old_world)):
            raise ValueError(f"load_resharded needs the sampler state of each of the {old_world} data-parallel "
                             f"ranks, got ranks {sorted(s.get('rank', -1) for s in states)}")
        for s in states:
            self._check_compatible(s)
        if len({s["pos"] for s in states}) != 1:
            raise ValueError(f"the saved sampler states disagree on the pool position: {[s['pos'] for s in states]}")
        counts = np.sum([np.asarray(s["counts"], dtype=np.int64) for s in states], axis=0)
        self.counts = counts if self.rank == 0 else np.zeros_like(counts)
        if states[0]["pool_start"] is None:
            return 0
        start = {"world": old_world, "offset": 0, **states[0]["pool_start"]}  # states saved before resharding
        taken = states[0]["pos"] * old_world  # batches of the current pool the old ranks consumed
        self._restart_pool(start, offset=taken)
        self._pos = 0
        return self._cut


def eval_batches(ds: MultilingualDataset, max_tokens: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """Every example of the split exactly once, length-sorted batches, dealt out to ranks.

    Each rank gets the same NUMBER of batches (ZeRO-3 forwards are collective); ranks short of one
    get an empty list and must still run a forward with zero weight.
    """
    batches = []
    for k in range(ds.num_langs):
        idx = np.arange(ds.sizes[k])
        batches += pack_by_length([(k, int(i)) for i in idx], ds.example_len(k, idx), max_tokens)
    per_rank = math.ceil(len(batches) / world)
    mine = batches[rank::world]
    return mine + [[] for _ in range(per_rank - len(mine))]
