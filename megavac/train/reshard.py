"""Resume on another layout (world size, data-parallel size, pipeline stages → none) through DeepSpeed's
universal checkpoint.

A ZeRO checkpoint is cut by the layout that wrote it: optimizer shards per data-parallel rank, layer
files per pipeline stage. DeepSpeed's ``ds_to_universal`` rewrites one as a folder per parameter (fp32
weights, Adam's two moments, whole), and an engine built with ``"checkpoint": {"load_universal": true}``
loads that into any layout. Kept exactly: weights, optimizer moments and step counts, the lr schedule, the
method's state (GradVac EMA, CATS α/λ, ...), the step, best loss. Re-dealt: the data stream (see
``TemperatureSampler.load_resharded``: no sample repeated, fewer than one round of batches of the pool in
progress skipped). Not kept: the per-rank random streams (dropout), which are seeded anew from
(seed, rank, step), since the ranks they belonged to no longer exist.

A pipelined checkpoint names parameters by pipeline layer (``3.ffn.fn.fc1.weight``); when it is resumed
without a pipeline, the converted folders are renamed to the plain ``Transformer`` names and the module file
gets the plain state dict. Resuming INTO a pipeline from another layout is refused by name.

The conversion is written next to the checkpoints, in ``checkpoints/universal/<tag>`` (rank 0, atomically),
and removed once the resumed run has saved its first checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from megavac import distributed

UNIVERSAL = "universal"
DONE = "megavac_converted.json"


def layout(meta: dict) -> tuple[int, int]:
    return int(meta.get("world_size") or 1), int(meta.get("pipeline_stages") or 1)


def check_supported(saved: dict, world: int, stages: int, where) -> None:
    old_world, old_stages = layout(saved)
    if stages > 1:
        raise ValueError(f"--resume: {where} was written with world_size={old_world}, pipeline_stages={old_stages}; "
                         f"this run has world_size={world}, pipeline_stages={stages}. A changed layout can be resumed "
                         "without a pipeline (any world size), or into a pipeline of the same layout only")


def universal_dir(root: Path, tag: str) -> Path:
    return Path(root) / UNIVERSAL / tag


def convert(root: Path, tag: str, saved: dict) -> Path:
    """``root/universal/<tag>`` from ``root/<tag>`` (rank 0 only; a finished conversion is reused)."""
    out = universal_dir(root, tag)
    if (out / DONE).is_file():
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # The other ranks wait in a collective meanwhile (30 min timeout): use the node's cores.
    workers = max(1, min(8, os.cpu_count() or 1))
    args = argparse.Namespace(input_folder=str(Path(root) / tag), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # megavac's engines do not record the info it wants
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress bars: keep stdout for the run's lines
        ds_to_universal.main(args)
    if layout(saved)[1] > 1:
        _plain_names(tmp, Path(root) / tag, saved)
    (tmp / DONE).write_text(json.dumps({"from": str(Path(root) / tag), "world_size": layout(saved)[0],
                                        "pipeline_stages": layout(saved)[1]}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _plain_names(conv: Path, tag_dir: Path, saved: dict) -> None:
    """A pipelined checkpoint's universal form, renamed to the plain Transformer's parameter names."""
    from megavac.model import ModelConfig
    from megavac.model.pipeline import plain_name, plain_state_dict_from_layer_files

    cfg = ModelConfig(**saved["model"])
    for d in sorted((conv / "zero").iterdir()):
        if d.is_dir():
            d.rename(conv / "zero" / plain_name(cfg, d.name))
    files = sorted(conv.glob("mp_rank_*_model_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False)  # stage 0's: it holds client_state
    state["module"] = plain_state_dict_from_layer_files(tag_dir, cfg)
    state["mp_world_size"] = 1  # DeepSpeed counted the stages' files as model-parallel ranks
    for f in files:
        f.unlink()
    torch.save(state, conv / "mp_rank_00_model_states.pt")


def load(engine, root: Path, tag: str, saved: dict, rank: int, dp_rank: int) -> tuple[dict, list[dict]]:
    """Load ``root/<tag>`` written under another layout into ``engine`` (built with load_universal).
    Returns (global state, every old data-parallel rank's sampler state)."""
    error = ""
    if rank == 0:
        try:
            print(f"--resume: {root / tag} was written with world_size={layout(saved)[0]}, pipeline_stages="
                  f"{layout(saved)[1]}: converting it to a universal checkpoint in {universal_dir(root, tag)}",
                  flush=True)
            convert(root, tag, saved)
        except Exception as e:  # every rank must leave together, not wait in the barrier
            error = f"converting {root / tag} to a universal checkpoint failed: {type(e).__name__}: {e}"
    if distributed.all_reduce_sum(torch.tensor([float(bool(error))], device=distributed.device())).item():
        raise ValueError(error or "converting the checkpoint to a universal checkpoint failed (rank 0 says why)")
    try:
        path, client = engine.load_checkpoint(str(Path(root) / UNIVERSAL), tag=tag)
    except Exception as e:  # a file changed or damaged after the conversion: one line, not a traceback
        raise ValueError(f"could not load the universal checkpoint {universal_dir(root, tag)}: "
                         f"{type(e).__name__}: {e}") from None
    if path is None or not client or "megavac" not in client:
        raise ValueError(f"could not load the universal checkpoint {universal_dir(root, tag)} "
                         "(no megavac state in it)")
    states = {}
    old_dp = layout(saved)[0] // layout(saved)[1]
    for r in range(layout(saved)[0]):
        f = Path(root) / tag / f"megavac_rank{r}.pt"
        if not f.is_file():
            raise ValueError(f"{f} is missing: a checkpoint written by {layout(saved)[0]} ranks needs all their files")
        try:
            sampler = torch.load(f, weights_only=False)["sampler"]
        except Exception as e:
            raise ValueError(f"{f}: corrupt or unreadable ({type(e).__name__}: {e})") from None
        # Written before the sampler recorded its rank: DeepSpeed's pipeline grid numbers ranks stage-major.
        sampler.setdefault("rank", r % old_dp)
        states[sampler["rank"]] = sampler  # pipeline stages of one data-parallel rank hold the same state
    return client["megavac"], [states[k] for k in sorted(states)]


def remove_conversion(root: Path, tag: str) -> None:
    shutil.rmtree(universal_dir(root, tag), ignore_errors=True)
    with contextlib.suppress(OSError):
        (Path(root) / UNIVERSAL / "latest_universal").unlink()  # ds_to_universal's pointer
    with contextlib.suppress(OSError):
        (Path(root) / UNIVERSAL).rmdir()  # only when empty
