"""What may change on ``--resume``: the saved run's settings against this run's, compared by name.

Each checkpoint's ``megavac.json`` carries the effective settings of the run that wrote it
(``effective_settings``: after the DeepSpeed JSON and the command line are merged). On resume:
- FIXED settings must be equal, else a ValueError names each change and why it cannot change (the
  parameters' shapes, the data order and what the method's state is indexed by);
- APPLIED settings take effect from the resumed step, and each change is printed (``--lr`` is applied
  to the restored schedule, which otherwise keeps the checkpoint's peak lr);
- anything else (paths, display) is neither compared nor printed.
The data itself (SentencePiece model, language list, tag ids) is compared by ``megavac.fingerprint``.
World size and pipeline layout are the checkpoint loader's business (universal checkpoints).
"""
from __future__ import annotations

FIXED = {
    "model": "the parameters' shapes",
    "seed": "the data order and the dropout streams",
    "precision": "the optimizer state's dtype and layout",
    "zero_stage": "the optimizer state's partitioning",
    "temperature": "the sampler's stream (its position is saved, not its draws)",
    "lang_weights": "the sampler's stream (its position is saved, not its draws)",
    "max_tokens": "the sampler's stream (its position is saved, not its draws)",
    "pool_batches": "the sampler's stream (its position is saved, not its draws)",
    "lang_affine": "the sampler's stream (its position is saved, not its draws)",
    "method": "the method's saved state",
    "granularity": "the shape of the method's saved state (one entry per parameter group)",
    "langs_per_batch": "the sampler's stream and the method's setting",
    "method_options": "the method's saved state was built with them",
}
APPLIED = ("lr", "warmup_steps", "max_steps", "clip_norm", "grad_accum", "dropout", "label_smoothing",
           "save_interval", "keep_last", "log_interval", "lang_log_interval", "valid_interval",
           "valid_max_tokens", "max_loss", "max_skipped_steps", "collector", "gram_log_interval")


def effective_settings(data, train, method, model, ds: dict) -> dict:
    """The settings of a run as they take effect (DeepSpeed JSON merged with the command line)."""
    from dataclasses import asdict

    from megavac.config import precision_of

    m = normal_model(asdict(model) if not isinstance(model, dict) else model)
    dropout = m.pop("dropout", None)
    return {
        "model": m, "dropout": dropout, "seed": train.seed, "precision": precision_of(ds),
        "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
        "temperature": data.temperature, "lang_weights": data.lang_weights, "max_tokens": data.max_tokens,
        "pool_batches": data.pool_batches, "lang_affine": data.lang_affine,
        "method": method.method, "granularity": method.granularity, "langs_per_batch": method.langs_per_batch,
        "method_options": method.options, "collector": method.collector,
        "gram_log_interval": method.gram_log_interval,
        "lr": ds["optimizer"]["params"]["lr"], "warmup_steps": train.warmup_steps, "max_steps": train.max_steps,
        "clip_norm": ds.get("gradient_clipping"), "grad_accum": ds["gradient_accumulation_steps"],
        "label_smoothing": train.label_smoothing, "save_interval": train.save_interval,
        "keep_last": train.keep_last, "log_interval": train.log_interval,
        "lang_log_interval": train.lang_log_interval, "valid_interval": train.valid_interval,
        "valid_max_tokens": train.valid_max_tokens, "max_loss": train.max_loss,
        "max_skipped_steps": train.max_skipped_steps,
    }


def normal_model(model: dict) -> dict:
    """A saved model dict with ModelConfig's defaults filled in: ``to_dict`` leaves out options at their
    defaults (so older checkpoints stay comparable), and a missing key must read as its default."""
    from dataclasses import MISSING, fields

    from megavac.model import ModelConfig

    return {**{f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}, **model}


def _flag(key: str) -> str:
    return {"model": "--model", "method_options": "the --<method>-* options", "precision": "--precision",
            "clip_norm": "--clip-norm"}.get(key, "--" + key.replace("_", "-"))


def _diff(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return ", ".join(f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in keys)
    return f"{a!r} → {b!r}"


def compare(saved: dict | None, now: dict, where: str) -> dict[str, tuple]:
    """{key: (saved, now)} of the APPLIED settings that changed; ValueError naming every FIXED change.
    ``saved`` None (a checkpoint written before settings were saved) compares nothing."""
    if saved is None:
        return {}
    if isinstance(saved.get("model"), dict):  # dropout is compared on its own (it may change)
        saved = {**saved, "model": {k: v for k, v in normal_model(saved["model"]).items() if k != "dropout"}}
    refused = [f"{_flag(k)} ({_diff(saved[k], now[k])}): it fixes {why}"
               for k, why in FIXED.items() if k in saved and saved[k] != now[k]]
    if refused:
        raise ValueError(f"--resume: these settings differ from the run that wrote {where} and cannot change "
                         f"on resume: {'; '.join(refused)}. Use the original settings, or start a new run in "
                         "another --save-dir")
    return {k: (saved[k], now[k]) for k in APPLIED if k in saved and saved[k] != now[k]}
