"""Read side of training checkpoints: one consolidated fp32 model from a DeepSpeed checkpoint.

Layout written by the trainer (``engine.save_checkpoint(root, tag)``)::

    <root>/latest            DeepSpeed's pointer file: the newest tag
    <root>/best              same format, written by the trainer: the best tag so far
    <root>/step_<N>/         DeepSpeed's shards (ZeRO 1/2/3, any number of ranks)
    <root>/step_<N>/megavac.json   {"model": ModelConfig dict, "data_dir": ..., "step": N, ...}

Consolidation is DeepSpeed's own ``zero_to_fp32``: it only reads files, so it runs in a single
process without ``torch.distributed`` and whatever the number of writer ranks was. A pipelined run's
checkpoint (``zero_to_fp32`` cannot parse those) is read from DeepSpeed's per-layer files
``layer_XX-model_states.pt`` instead, mapped back to the plain Transformer's names
(``megavac.model.pipeline``); they hold the module weights, which are the fp32 weights of an fp32 run and
the 16-bit working copy of a bf16/fp16 one.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from megavac.model import ModelConfig, Transformer

META_FILE = "megavac.json"
POINTER_FILES = ("latest", "best")


def resolve_checkpoint(path, tag: str | None = None) -> tuple[Path, str]:
    """(root, tag) for a checkpoint root plus ``tag`` (latest|best|step_N) or a tag folder.

    A folder holding ``megavac.json`` or DeepSpeed model-state files is taken as a tag folder
    (then ``tag`` must be None or its own name); anything else is a root.
    """
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"checkpoint path {str(p)!r} does not exist or is not a directory")
    if _is_tag_dir(p):
        if tag not in (None, p.name):
            raise ValueError(f"{str(p)!r} is already a tag folder; drop tag={tag!r} or pass its parent")
        return p.parent, p.name
    tag = tag or "latest"
    if tag in POINTER_FILES:
        pointer = p / tag
        if not pointer.is_file():
            raise ValueError(f"no {tag!r} file in checkpoint root {str(p)!r}")
        tag = pointer.read_text().strip()
        if not tag:
            raise ValueError(f"pointer file {str(pointer)!r} is empty")
    if not (p / tag).is_dir():
        raise ValueError(f"checkpoint tag folder {str(p / tag)!r} does not exist")
    return p, tag


def _is_tag_dir(p: Path) -> bool:
    return (p / META_FILE).is_file() or any(p.glob("*_model_states.pt"))


def read_meta(tag_dir) -> dict:
    """The trainer's ``megavac.json`` of one tag folder, checked for the keys we need."""
    f = Path(tag_dir) / META_FILE
    if not f.is_file():
        raise ValueError(f"missing {str(f)!r}: not a megavac checkpoint (the trainer writes it next to the shards)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(f)!r} is not valid JSON: {e}") from None
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{str(f)!r} lacks the 'model' key (ModelConfig as a dict)")
    return meta


def build_model(model_dict: dict) -> Transformer:
    """A Transformer from a saved ModelConfig dict; unknown keys are an error, not ignored."""
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(model_dict) - known)
    if unknown:
        raise ValueError(f"megavac.json 'model' has keys unknown to ModelConfig: {unknown}")
    return Transformer(ModelConfig(**model_dict))


def consolidated_state_dict(root, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict merged from all ZeRO shards of ``root/tag`` (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(root) / tag
    if not any(tag_dir.glob("*_optim_states.pt")):
        return _unpartitioned_state_dict(tag_dir)
    # zero_to_fp32 reports progress with print/tqdm; keep stdout clean for result tables.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except FileNotFoundError as e:
            raise ValueError(f"cannot consolidate checkpoint {str(Path(root) / tag)!r}: {e}") from None


def _unpartitioned_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Without ZeRO (stage 0) DeepSpeed writes no optimizer shards, and zero_to_fp32 cannot parse
    the checkpoint; the single model-state file then holds the whole module."""
    f = tag_dir / "mp_rank_00_model_states.pt"
    if not f.is_file():
        raise ValueError(f"no DeepSpeed model or optimizer state files in {str(tag_dir)!r}")
    module = torch.load(f, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def load_model_from_checkpoint(path, tag: str | None = None) -> tuple[Transformer, dict]:
    """(fp32 model on CPU in eval mode, megavac.json dict) from a checkpoint root or tag folder.

    The returned meta dict gains ``"tag"`` (the resolved tag), ``"checkpoint_dir"`` (the tag
    folder) and ``"checkpoint_root"`` so callers can report exactly what they evaluated.
    """
    root, tag = resolve_checkpoint(path, tag)
    meta = read_meta(root / tag)
    model = build_model(meta["model"])
    if any((root / tag).glob("layer_*-model_states.pt")):
        from megavac.model.pipeline import plain_state_dict_from_layer_files

        state = plain_state_dict_from_layer_files(root / tag, model.cfg)
    else:
        state = consolidated_state_dict(root, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(root / tag)!r} does not match its megavac.json model config: "
            f"missing={sorted(missing)} unexpected={sorted(unexpected)}"
        )
    tag_dir = str((root / tag).resolve())
    meta = {**meta, "tag": tag, "checkpoint_dir": tag_dir, "checkpoint_root": str(root.resolve()),
            "kind": "checkpoint", "source": tag_dir}
    return model.float().eval(), meta


def load_model(path, tag: str | None = None) -> tuple[Transformer, dict]:
    """(fp32 model on CPU in eval mode, meta dict) from a checkpoint root, a tag folder or an export file.

    The one loader every consumer uses. For a checkpoint the meta is ``megavac.json`` plus what
    :func:`load_model_from_checkpoint` adds; for an export file (``megavac.evaluation.export``) it is the
    same keys taken from the file (``model``, ``data_dir``, ``langs``, ``data_fingerprint``, ``step``,
    ``tag``: the file's stem) plus ``"export"``, the file's dict without the weights. Both carry ``"kind"``
    (``checkpoint`` or ``export``) and ``"source"`` (the tag folder or the file: what messages name).
    """
    p = Path(path)
    if p.is_file():
        from megavac.evaluation.export import load_export, meta_of_export, model_from_export

        if tag is not None:
            raise ValueError(f"{str(p)!r} is an export file, which holds one model; a tag ({tag!r}) "
                             "applies to checkpoint roots only")
        exp = load_export(p)
        return model_from_export(exp, p), meta_of_export(exp, p)
    return load_model_from_checkpoint(p, tag)
