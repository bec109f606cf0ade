"""One file per trained model: weights, architecture, SentencePiece model and languages.

An export is what leaves a run: everything translation needs, in one ``torch.save``'d dict, with no
data dir and no DeepSpeed. ``launch/export.py`` writes one from a checkpoint, ``launch/average.py`` from
the average of several; ``launch/evaluate.py`` and ``launch/translate.py`` read it wherever they read a
checkpoint (``consolidate.load_model``).

Format (``format_version`` 1; read with ``torch.load(path, weights_only=True)``)::

    {
      "format": "megavac-model",
      "format_version": 1,
      "dtype": "float32" | "bfloat16",          # of the floating-point weights
      "model": {...},                            # ModelConfig as a dict
      "state_dict": {name: tensor},              # the consolidated Transformer weights, CPU
      "spm_model": bytes,                        # the prepared data dir's spm.model, byte for byte
      "special_ids": {"pad_id", "unk_id", "bos_id", "eos_id"},
      "tasks": [{"name", "pair", "src", "tgt", "tag", "tag_id"}],   # the trained languages, training order
      "data_fingerprint": {"spm_sha256", "vocab_size", "langs", "tag_ids"},   # megavac.fingerprint
      "provenance": {"checkpoints": [{"dir", "tag", "step", "val_loss"}], "averaged": n,
                     "data_dir": str, "created": ISO 8601 UTC, "megavac": version, "torch": version},
    }

``data_fingerprint`` is the checkpoint's own (``megavac.json``) when it has one, after checking the data
dir against it; a checkpoint written before fingerprints existed gets the data dir's. ``spm_model``'s
sha256 always equals ``data_fingerprint["spm_sha256"]``.

:class:`Translator` turns raw sentences into raw translations with an export's model, SentencePiece
model and language tags (``launch/translate.py``).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from megavac.evaluation.consolidate import build_model
from megavac.evaluation.generate import SearchConfig, translate

log = logging.getLogger(__name__)

FORMAT = "megavac-model"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KEYS = ("dtype", "model", "state_dict", "spm_model", "special_ids", "tasks", "data_fingerprint", "provenance")
TASK_FIELDS = ("name", "pair", "src", "tgt", "tag", "tag_id")
SPECIAL = ("pad_id", "unk_id", "bos_id", "eos_id")


# ---------------------------------------------------------------- writing


def build_export(state: dict[str, torch.Tensor], meta: dict, data_dir=None, dtype: str = "fp32",
                 checkpoints: list[dict] | None = None) -> dict:
    """The export dict of consolidated weights ``state`` and their checkpoint ``meta`` (``load_model``'s).

    ``data_dir`` (default: the checkpoint's ``data_dir``) supplies the SentencePiece model and the
    languages; it is checked against the checkpoint's data fingerprint first. ``checkpoints`` is the
    provenance list (default: the one checkpoint ``meta`` describes).
    """
    from data_pipeline.indexed import load_meta, select_langs, spm_path
    from megavac.fingerprint import check_data_fingerprint, data_fingerprint, file_sha256

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    what = meta.get("source", "the checkpoint")
    data_dir = data_dir or meta.get("data_dir")
    if not data_dir:
        raise ValueError(f"{what}: megavac.json names no data_dir; pass --data-dir (the prepared data the model "
                         "was trained on: its SentencePiece model and language tags go into the export)")
    if not Path(data_dir).is_dir():
        raise ValueError(f"data dir {str(data_dir)!r} (named by {what}) does not exist; pass --data-dir")
    data_meta = load_meta(data_dir)
    names = meta.get("langs") or [t["name"] for t in data_meta["tasks"]]
    saved = meta.get("data_fingerprint")
    check_data_fingerprint(saved, data_dir, what=what, names=names)
    fingerprint = saved or data_fingerprint(data_dir, names)
    model_cfg = meta["model"]
    for key in ("vocab_size", "pad_id"):
        if data_meta[key] != model_cfg[key]:
            raise ValueError(f"data dir {str(data_dir)!r} has {key}={data_meta[key]}, {what} has {model_cfg[key]}")
    spm_file = spm_path(data_dir)
    if file_sha256(spm_file) != fingerprint["spm_sha256"]:
        raise ValueError(f"{spm_file} is not the SentencePiece model of the data fingerprint of {what} "
                         f"(sha256 {fingerprint['spm_sha256'][:12]}…)")
    tasks = [{k: t.get(k) for k in TASK_FIELDS} for t in select_langs(data_meta, names, data_dir)]
    torch_dtype = DTYPES[dtype]
    weights = {k: (v.detach().to("cpu", torch_dtype) if v.is_floating_point() else v.detach().cpu()).clone()
               for k, v in state.items()}
    if checkpoints is None:
        checkpoints = [checkpoint_record(meta)]
    info = {  # plain JSON types only: the file loads with torch.load(weights_only=True)
        "model": dict(model_cfg),
        "special_ids": {k: int(data_meta[k]) for k in SPECIAL},
        "tasks": tasks,
        "data_fingerprint": fingerprint,
        "provenance": {
            "checkpoints": checkpoints,
            "averaged": len(checkpoints),
            "data_dir": str(Path(data_dir).resolve()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "megavac": _version(),
            "torch": str(torch.__version__),
        },
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "state_dict": weights,
        "spm_model": spm_file.read_bytes(),
        **json.loads(json.dumps(info)),
    }


def checkpoint_record(meta: dict) -> dict:
    """Provenance entry of one checkpoint meta (``load_model_from_checkpoint``'s)."""
    return {"dir": meta.get("checkpoint_dir"), "tag": meta.get("tag"), "step": meta.get("step"),
            "val_loss": meta.get("val_loss")}


def _version() -> str:
    import megavac

    return megavac.__version__


def save_export(exp: dict, path) -> Path:
    """Write ``exp`` to ``path`` atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(exp, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_checkpoint(path, out, tag: str | None = None, data_dir=None, dtype: str = "fp32") -> dict:
    """Consolidate one checkpoint (root + tag, or tag folder) and write it as an export file."""
    from megavac.evaluation.consolidate import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(path, tag)
    exp = build_export(model.state_dict(), meta, data_dir, dtype)
    save_export(exp, out)
    return exp


# ---------------------------------------------------------------- reading


def load_export(path) -> dict:
    """An export file's dict, its format and keys checked (a ValueError names the file otherwise)."""
    path = Path(path)
    try:
        exp = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"export file {str(path)!r} does not exist") from None
    except Exception as e:  # not a torch file, or one holding objects other than tensors and plain data
        raise ValueError(f"{str(path)!r} is not a megavac export file (torch.load(weights_only=True) failed: "
                         f"{type(e).__name__}); pass a checkpoint root, a tag folder or a file written by "
                         "launch/export.py or launch/average.py") from None
    if not isinstance(exp, dict) or exp.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a megavac export file (no format {FORMAT!r}); pass a checkpoint "
                         "root, a tag folder or a file written by launch/export.py or launch/average.py")
    if exp.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r}: export format_version {exp.get('format_version')!r} is not supported "
                         f"(this megavac reads {FORMAT_VERSION}); export the checkpoint again")
    missing = [k for k in KEYS if k not in exp]
    if missing:
        raise ValueError(f"{str(path)!r}: export lacks {missing}")
    return exp


def model_from_export(exp: dict, path="the export") -> torch.nn.Module:
    """fp32 Transformer on CPU in eval mode with the export's weights (bf16 ones widened exactly)."""
    model = build_model(exp["model"])
    missing, unexpected = model.load_state_dict(exp["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{str(path)!r}: weights do not match the model config: "
                         f"missing={sorted(missing)} unexpected={sorted(unexpected)}")
    return model.float().eval()


def meta_of_export(exp: dict, path) -> dict:
    """The checkpoint-like meta of an export (``consolidate.load_model``): what evaluation reports and checks."""
    path = Path(path).resolve()
    prov = exp["provenance"]
    ckpts = prov.get("checkpoints") or []
    return {
        "model": exp["model"],
        "data_dir": prov.get("data_dir"),
        "langs": [t["name"] for t in exp["tasks"]],
        "data_fingerprint": exp["data_fingerprint"],
        "step": ckpts[-1].get("step") if len(ckpts) == 1 else None,
        "steps": [c.get("step") for c in ckpts],
        "tag": path.stem,
        "checkpoint_dir": str(path),
        "checkpoint_root": str(path.parent),
        "kind": "export",
        "source": str(path),
        "export": {k: v for k, v in exp.items() if k != "state_dict"},
        **({"averaged": ckpts} if len(ckpts) > 1 else {}),
    }


# ---------------------------------------------------------------- translation


def pick_task(tasks: Sequence[dict], to: str, src: str | None = None) -> dict:
    """The language whose target is ``to`` (and source ``src``, when given): its tag selects the output.

    Several languages into ``to`` are fine when they share one tag (``de-en`` and ``fr-en`` both use
    ``<2en>``); with different tags ``src`` must choose. Errors list what is available.
    """
    targets = sorted({t["tgt"] for t in tasks})
    into = [t for t in tasks if t["tgt"] == to]
    if not into:
        raise ValueError(f"the model does not translate into {to!r}; available targets (--to): {', '.join(targets)}")
    if src is not None:
        chosen = [t for t in into if t["src"] == src]
        if not chosen:
            raise ValueError(f"the model does not translate {src!r} into {to!r}; sources (--from) for {to!r}: "
                             f"{', '.join(sorted({t['src'] for t in into}))}")
        return chosen[0]
    if len({t["tag_id"] for t in into}) > 1:
        raise ValueError(f"--to {to!r} is ambiguous: {', '.join(t['name'] for t in into)} use different language "
                         f"tags; pass --from ({', '.join(sorted({t['src'] for t in into}))})")
    return into[0]


class Translator:
    """Raw sentences in, raw translations out, with an export's model, SentencePiece model and tags."""

    def __init__(self, model, exp: dict, device: str = "cpu", search: SearchConfig | None = None,
                 source: str = "the model"):
        import sentencepiece as spm

        sha = hashlib.sha256(exp["spm_model"]).hexdigest()
        if sha != exp["data_fingerprint"]["spm_sha256"]:
            raise ValueError(f"{source}: its SentencePiece model does not match its data fingerprint "
                             "(a damaged or hand-edited export); export the checkpoint again")
        self.sp = spm.SentencePieceProcessor(model_proto=exp["spm_model"])
        if self.sp.get_piece_size() != model.cfg.vocab_size:
            raise ValueError(f"{source}: SentencePiece model has {self.sp.get_piece_size()} pieces, the model "
                             f"{model.cfg.vocab_size}")
        self.ids = exp["special_ids"]
        self.tasks = exp["tasks"]
        self.search = replace(search or SearchConfig(), bos_id=self.ids["bos_id"], eos_id=self.ids["eos_id"],
                              pad_id=self.ids["pad_id"])
        self.device = device
        self.model = model.to(device).eval()
        from megavac.evaluation.evaluate import language_index

        # A model with family experts routes each sentence by its language's index (``tasks`` are in training order).
        self.lang_index = language_index(model, [t["name"] for t in self.tasks], source)

    def task(self, to: str, src: str | None = None) -> dict:
        return pick_task(self.tasks, to, src)

    def __call__(self, lines: Sequence[str], task: dict, max_tokens: int = 4000, max_sentences: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[str]:
        """Translations of ``lines`` in order; blank lines give empty translations (and are not decoded)."""
        from megavac.evaluation.evaluate import encode_sources

        keep = [i for i, line in enumerate(lines) if line.strip()]
        out = [""] * len(lines)
        if keep:
            sources = encode_sources(self.sp, [lines[i] for i in keep], task, self.ids["eos_id"],
                                     self.model.cfg.max_positions)
            ids = translate(self.model, sources, self.search, max_tokens, self.device, progress, max_sentences,
                            lang=None if self.lang_index is None else self.lang_index[task["name"]])
            for i, hyp in zip(keep, ids):
                # One output line per input line, whatever the detokeniser makes of odd pieces.
                out[i] = self.sp.decode(hyp).replace("\r", " ").replace("\n", " ")
        if progress is not None and len(keep) < len(lines):
            progress(len(lines) - len(keep))
        return out


def load_translator(path, tag: str | None = None, data_dir=None, device: str = "cpu",
                    search: SearchConfig | None = None) -> Translator:
    """A :class:`Translator` from an export file, or from a checkpoint (root or tag folder) plus its data dir
    (default: the one its megavac.json names), checked against the checkpoint's data fingerprint."""
    from megavac.evaluation.consolidate import load_model

    model, meta = load_model(path, tag)
    if meta["kind"] == "export":
        if data_dir is not None:
            raise ValueError(f"{meta['source']} is an export file: it carries its SentencePiece model; drop --data-dir")
        exp = meta["export"]
    else:
        exp = build_export({}, meta, data_dir)
    return Translator(model, exp, device, search, meta["source"])


def summary(exp: dict, path) -> str:
    """One line about a written export, for the command line."""
    n = sum(v.numel() for v in exp["state_dict"].values())
    ckpts = exp["provenance"]["checkpoints"]
    src = ", ".join(str(c["tag"]) for c in ckpts)
    names = [t["name"] for t in exp["tasks"]]
    return (f"wrote {path}: {n:,} {exp['dtype']} weights, {len(names)} languages ({', '.join(names[:8])}"
            f"{' …' if len(names) > 8 else ''}), "
            f"{'average of ' if len(ckpts) > 1 else 'from '}{src}, "
            f"SentencePiece sha256 {exp['data_fingerprint']['spm_sha256'][:12]}")


def read_lines(stream, name: str, buffer: int):
    """Lists of up to ``buffer`` lines, split on b"\\n" only (as evaluation reads raw text), UTF-8 checked."""
    lines = []
    for n, raw in enumerate(stream, 1):
        try:
            lines.append(raw.removesuffix(b"\n").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: line {n}: invalid UTF-8 at byte {e.start} of the line") from None
        if len(lines) == buffer:
            yield lines
            lines = []
    if lines:
        yield lines


def translate_stream(translator: Translator, task: dict, src, out, name: str = "input", buffer: int = 10_000,
                     max_tokens: int = 4000, max_sentences: int | None = None,
                     progress: Callable[[int], None] | None = None) -> int:
    """Translate the binary stream ``src`` line by line into the binary stream ``out`` (UTF-8, "\\n"-terminated
    lines, input order), ``buffer`` lines at a time; returns the number of lines."""
    n = 0
    for lines in read_lines(src, name, buffer):
        hyps = translator(lines, task, max_tokens, max_sentences, progress)
        out.write("".join(h + "\n" for h in hyps).encode("utf-8"))
        out.flush()
        n += len(lines)
    return n


def count_lines(path) -> int:
    """Lines of a file (an unterminated last line counts), for a progress bar's total."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n, last = n + block.count(b"\n"), block[-1:]
    return n + (last != b"\n")
