"""Checkpoint averaging (fairseq's ``average_checkpoints.py``): the mean of several checkpoints' weights.

Each checkpoint is consolidated as evaluation does (``consolidate.load_model_from_checkpoint``: any ZeRO
stage, any number of writer ranks, pipeline layer files) and summed in float64 one at a time, so memory
holds the running sum and one model; the mean is returned in fp32. The checkpoints must share the model
config, the languages and the data fingerprint (refused by name otherwise). ``launch/average.py`` writes the
result as an export file (``megavac.evaluation.export``); ``launch/evaluate.py --average-last N`` evaluates
it directly.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from megavac.evaluation.consolidate import (META_FILE, POINTER_FILES, _is_tag_dir, build_model,
                                            load_model_from_checkpoint, resolve_checkpoint)

STEP_TAG = re.compile(r"step_(\d+)")


def step_tags(root) -> list[str]:
    """The complete ``step_N`` tag folders of a checkpoint root (``megavac.json`` written), oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"checkpoint root {str(root)!r} does not exist or is not a directory")
    tags = [d.name for d in root.iterdir() if d.is_dir() and STEP_TAG.fullmatch(d.name) and (d / META_FILE).is_file()]
    return sorted(tags, key=lambda t: int(t[5:]))


def select_tags(root, last: int | None = None, tags=None) -> list[str]:
    """The tags to average: the newest ``last`` step checkpoints, or ``tags`` (names, ``latest``/``best``
    resolved; a list or a comma-separated string). Exactly one of the two."""
    if _is_tag_dir(Path(root)):
        raise ValueError(f"{str(root)!r} is one checkpoint (a tag folder); averaging takes the checkpoint root, "
                         f"its parent {str(Path(root).parent)!r}")
    if (last is None) == (not tags):
        raise ValueError("give the number of newest checkpoints to average (--last N) or their tags (--tags), not both")
    if tags:
        names = [t.strip() for t in (tags.split(",") if isinstance(tags, str) else tags) if t.strip()]
        resolved = [resolve_checkpoint(root, t)[1] for t in names]
        repeated = sorted({t for t in resolved if resolved.count(t) > 1})
        if repeated:
            raise ValueError(f"checkpoint(s) {repeated} named more than once in {names} "
                             f"({', '.join(POINTER_FILES)} are pointers to step tags)")
        return resolved
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    have = step_tags(root)
    if len(have) < last:
        raise ValueError(f"cannot average the last {last} checkpoints: {str(root)!r} has {len(have)} "
                         f"({', '.join(have) or 'none'}); the trainer keeps --keep-last of them")
    return have[-last:]


def average_checkpoints(root, tags: list[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(fp32 mean of the consolidated weights of ``root/<tag>`` for each tag, their metas in that order)."""
    if not tags:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] | None = None
    metas = []
    for tag in tags:
        model, meta = load_model_from_checkpoint(root, tag)
        state = model.state_dict()
        if metas:
            _check_compatible(metas[0], meta)
        metas.append(meta)
        if total is None:
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
            continue
        for k, v in state.items():
            if v.is_floating_point():
                total[k] += v.double()
            elif not torch.equal(total[k], v):
                raise ValueError(f"{meta['source']}: non-floating tensor {k!r} differs from {metas[0]['source']}'s")
        del model, state
    mean = {k: (v / len(tags)).float() if v.is_floating_point() else v for k, v in total.items()}
    return mean, metas


def _check_compatible(first: dict, other: dict) -> None:
    from megavac.train.resume_check import normal_model

    a, b = first["source"], other["source"]
    # Dropout may change on --resume and does not change the weights' meaning: not compared.
    ma, mb = ({k: v for k, v in normal_model(m["model"]).items() if k != "dropout"} for m in (first, other))
    if ma != mb:
        diff = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        raise ValueError(f"cannot average {b} with {a}: their model configs differ in {diff}")
    if first.get("langs") and other.get("langs") and first["langs"] != other["langs"]:
        raise ValueError(f"cannot average {b} with {a}: trained on the languages {other['langs']} vs {first['langs']}")
    fa, fb = first.get("data_fingerprint"), other.get("data_fingerprint")
    if fa is not None and fb is not None and fa != fb:
        what = "SentencePiece model" if fa.get("spm_sha256") != fb.get("spm_sha256") else "data fingerprint"
        raise ValueError(f"cannot average {b} with {a}: their {what}s differ (trained on different prepared data)")


def averaged_meta(metas: list[dict]) -> dict:
    """One checkpoint-like meta for an average: the newest checkpoint's, with the averaged list."""
    from megavac.evaluation.export import checkpoint_record

    newest = metas[-1]
    fingerprint = next((m["data_fingerprint"] for m in metas if m.get("data_fingerprint")), None)
    tags = [m["tag"] for m in metas]
    return {
        **newest,
        "data_fingerprint": fingerprint,
        "tag": f"avg{len(metas)}_{tags[-1]}" if len(metas) > 1 else tags[0],
        "steps": [m.get("step") for m in metas],
        "val_loss": None,  # of no single checkpoint
        "averaged": [checkpoint_record(m) for m in metas],
        "source": f"{newest['checkpoint_root']}/{{{','.join(tags)}}}" if len(metas) > 1 else newest["source"],
    }


def averaged_model(root, last: int | None = None, tags=None) -> tuple[torch.nn.Module, dict, dict]:
    """(fp32 model in eval mode, meta, averaged weights) of the selected checkpoints of ``root``."""
    chosen = select_tags(root, last, tags)
    state, metas = average_checkpoints(root, chosen)
    meta = averaged_meta(metas)
    model = build_model(meta["model"])
    model.load_state_dict(state, strict=True)
    return model.float().eval(), meta, state


def average_to_export(root, out, last: int | None = None, tags=None, data_dir=None, dtype: str = "fp32") -> dict:
    """Average the selected checkpoints of ``root`` and write the result as an export file."""
    from megavac.evaluation.export import build_export, save_export

    chosen = select_tags(root, last, tags)
    state, metas = average_checkpoints(root, chosen)
    meta = averaged_meta(metas)
    exp = build_export(state, meta, data_dir, dtype, checkpoints=meta["averaged"])
    save_export(exp, out)
    return exp
