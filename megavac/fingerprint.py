"""The identity of the data a model was trained on, and the check every consumer makes against it.

A checkpoint's token ids mean something only with the SentencePiece model and the language tags they
were made with: the same corpus prepared again with another SentencePiece model of the same size gives
other ids for the same text. So every checkpoint (``megavac.json``) and export carries
``data_fingerprint(...)``, and resume, evaluation and translation call ``check_data_fingerprint``
before they read a single batch. Only what changes the meaning of ids is compared; the data dir's path
is not (a prepared directory can move).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 4 << 20) -> str:
    """sha256 of a file, read unbuffered into one reused buffer (checkpoint shards are GBs)."""
    h, buf = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def data_fingerprint(data_dir: str | Path, names: list[str] | None = None) -> dict:
    """{"spm_sha256", "vocab_size", "langs": [names], "tag_ids": {name: id}} of a prepared data dir,
    for the languages ``names`` (in training order; None: all of the directory's)."""
    from data_pipeline.indexed import load_meta

    meta = load_meta(data_dir)
    spm = Path(data_dir) / meta.get("spm", {}).get("model", "spm.model")
    if not spm.is_file():
        raise ValueError(f"{spm} is missing: the prepared data dir {data_dir} has no SentencePiece model")
    tags = {t["name"]: t["tag_id"] for t in meta["tasks"]}
    names = list(tags) if names is None else list(names)
    return {"spm_sha256": file_sha256(spm), "vocab_size": meta["vocab_size"], "langs": names,
            "tag_ids": {n: tags[n] for n in names if n in tags}}


def check_data_fingerprint(saved: dict | None, data_dir: str | Path, what: str, names: list[str] | None = None,
                           same_langs: bool = False) -> None:
    """ValueError naming the difference when ``data_dir`` is not the data ``saved`` was trained on.

    ``names``: the languages the consumer will use (None: all the checkpoint was trained on that the data
    dir has); each must have been trained and carry the same tag id. ``same_langs``: the language list
    must equal the trained one, in order (resume: the language index is part of the method's state).
    ``saved`` None (a checkpoint written before fingerprints existed) is accepted.
    """
    if saved is None:
        return
    have = data_fingerprint(data_dir)
    hint = (f"{what} was trained on data prepared with another SentencePiece model/vocabulary; pass the data "
            f"dir it was trained on (or prepare the corpus again with the same settings and --vocab-size)")
    if have["spm_sha256"] != saved["spm_sha256"]:
        raise ValueError(f"data dir {data_dir}: its SentencePiece model (sha256 {have['spm_sha256'][:12]}…) is not "
                         f"the one {what} was trained with (sha256 {saved['spm_sha256'][:12]}…): {hint}")
    if have["vocab_size"] != saved["vocab_size"]:
        raise ValueError(f"data dir {data_dir} has vocab_size {have['vocab_size']}, {what} was trained with "
                         f"{saved['vocab_size']}: {hint}")
    trained = saved["langs"]
    if names is None:
        names = [n for n in trained if n in have["tag_ids"]]
    if same_langs and list(names) != list(trained):
        added = [n for n in names if n not in trained]
        dropped = [n for n in trained if n not in names]
        change = (f"added {added}" if added else "") + ("; " if added and dropped else "") + \
                 (f"dropped {dropped}" if dropped else "") or "the same languages in another order"
        raise ValueError(f"{what} was trained on the languages {trained}; this run has {list(names)} ({change}). "
                         "The language list cannot change on resume (the sampler and the method's state are "
                         "indexed by it): keep --langs, or start a new run")
    unknown = [n for n in names if n not in saved["tag_ids"]]
    if unknown:
        raise ValueError(f"{what} was not trained on {unknown} (its languages: {trained})")
    moved = {n: (saved["tag_ids"][n], have["tag_ids"].get(n)) for n in names
             if have["tag_ids"].get(n) != saved["tag_ids"][n]}
    if moved:
        n, (old, new) = next(iter(moved.items()))
        raise ValueError(f"data dir {data_dir}: language {n} has tag id {new}, {what} was trained with {old} "
                         f"({len(moved)} languages differ): {hint}")
