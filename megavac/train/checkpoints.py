"""Sharded checkpoints through ``engine.save_checkpoint`` plus megavac's own state.

Layout under ``<save_dir>/checkpoints/``: DeepSpeed's tag folders ``step_<N>/`` and ``latest``
file, a ``best`` file in the same format, and inside each tag:
- ``megavac.json``: model config, data dir, step, validation loss (what evaluation needs);
- DeepSpeed's ``client_state`` (written by rank 0): global state (step, best loss, ...);
- ``megavac_rank<r>.pt``: per-rank state — sampler position and RNG states differ per rank and
  DeepSpeed writes client_state from rank 0 only.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megavac.distributed import barrier


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, save_dir: str, rank: int, keep_last: int, info: dict):
        self.root = Path(save_dir) / "checkpoints"
        self.rank, self.keep_last, self.info = rank, keep_last, info
        self.best_loss = float("inf")

    def tag_dir(self, tag: str) -> Path:
        return self.root / tag

    def read_tag(self, name: str) -> str | None:
        p = self.root / name
        return p.read_text().strip() if p.is_file() else None

    def save(self, engine, step: int, global_state: dict, rank_state: dict, val_loss: float | None):
        """Write every shard, then point ``latest`` at it: a run killed mid-save resumes from the
        previous complete checkpoint instead of a half-written one."""
        tag = f"step_{step}"
        is_best = val_loss is not None and val_loss < self.best_loss
        if is_best:
            self.best_loss = val_loss
        self.tag_dir(tag).mkdir(parents=True, exist_ok=True)
        torch.save({**rank_state, "rng": rng_state()}, self.tag_dir(tag) / f"megavac_rank{self.rank}.pt")
        client = {"megavac": {**global_state, "best_loss": self.best_loss, "step": step}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        barrier()
        if self.rank == 0:
            meta = {**self.info, "step": step, "val_loss": val_loss, "tag": tag}
            (self.tag_dir(tag) / "megavac.json").write_text(json.dumps(meta, indent=2))
            self._write_pointer("latest", tag)
            if is_best:
                self._write_pointer("best", tag)
            self._prune()
        barrier()
        return tag

    def _write_pointer(self, name: str, tag: str):
        """Atomically write a DeepSpeed-style pointer file (``latest``/``best``) holding a tag."""
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, self.root / name)

    def _prune(self):
        """Keep the newest ``keep_last`` step checkpoints and the best one."""
        keep = {self.read_tag("best"), self.read_tag("latest")}
        steps = sorted((d for d in self.root.glob("step_*") if d.is_dir()), key=lambda d: int(d.name[5:]))
        keep |= {d.name for d in steps[-self.keep_last:]} if self.keep_last > 0 else set()
        for d in steps:
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def load_latest(self, engine) -> tuple[dict, dict] | None:
        """Restore engine state from ``latest``; returns (global_state, this rank's state) or None."""
        tag = self.read_tag("latest")
        if tag is None:
            return None
        meta_file = self.tag_dir(tag) / "megavac.json"
        if meta_file.is_file():  # a different layout would fail deep inside DeepSpeed, or resume inexactly
            saved = json.loads(meta_file.read_text())
            for key, default in (("world_size", None), ("pipeline_stages", 1)):
                have, want = saved.get(key, default), self.info.get(key, default)
                if have is not None and have != want:
                    raise ValueError(f"--resume: {meta_file} was written with {key}={have}, this run has {key}={want}; "
                                     "resume with the same layout (the data order and optimizer shards depend on it)")
        path, client = engine.load_checkpoint(str(self.root), tag=tag)
        if path is None:
            raise ValueError(f"could not load checkpoint {self.tag_dir(tag)} (named by {self.root / 'latest'})")
        rank_file = self.tag_dir(tag) / f"megavac_rank{self.rank}.pt"
        if not rank_file.is_file():
            raise ValueError(f"{rank_file} is missing: the checkpoint was written by fewer ranks than this run has")
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state["rng"])
        state = client["megavac"]
        self.best_loss = state["best_loss"]
        return state, rank_state
