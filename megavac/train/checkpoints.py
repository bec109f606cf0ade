"""Sharded checkpoints through ``engine.save_checkpoint`` plus megavac's own state, checksummed.

Layout under ``<save_dir>/checkpoints/``: DeepSpeed's tag folders ``step_<N>/`` and ``latest``
file, a ``best`` file in the same format, and inside each tag:
- ``megavac.json``: model config, data dir, step, validation loss (what evaluation needs);
- DeepSpeed's ``client_state`` (written by rank 0): global state (step, best loss, ...);
- ``megavac_rank<r>.pt``: per-rank state — sampler position and RNG states differ per rank and
  DeepSpeed writes client_state from rank 0 only;
- ``checksums.json`` (``MANIFEST``): size and sha256 of every other file of the tag, written last. A tag
  folder with a manifest is complete; ``latest`` only ever names one (docs/design.md §5.4).

Save: every rank hashes the files it wrote (its ``megavac_rank<r>.pt`` and what DeepSpeed wrote through
its checkpoint engine: its optimizer shard, its layer files), the hashes meet on rank 0, which hashes what
is left in the folder (``megavac.json``), writes the manifest, then moves ``latest``. A failed write
(disk full, file size limit) is agreed on by every rank: the partial folder is removed, ``latest`` stays.

Resume: the tag ``latest`` names is verified (its files split over the ranks by size, the verdict shared)
before DeepSpeed reads anything. A damaged or incomplete one is named file by file and the newest tag that
verifies is loaded instead; if none does, a one-line ValueError. Tags without a manifest (written before
megavac checksummed checkpoints) load with a warning; their read errors still name the file.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megavac.distributed import barrier
from megavac.fingerprint import file_sha256  # noqa: F401  (also this module's public name, for tools)

MANIFEST = "checksums.json"
MANIFEST_FORMAT = "megavac-checksums/1"


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


# ---------------------------------------------------------------- errors that say what happened

class CheckpointWriteError(ValueError):
    """A checkpoint could not be written; nothing of it was committed (``latest`` did not move)."""


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "…"


def write_error_message(e: BaseException, path) -> str:
    """One line for a failed write of ``path``. torch.save into a path (its C++ writer) loses errno and
    says ``unexpected pos … vs …``; megavac's writes (``_torch_save``, ``_write_text``) keep it."""
    code = e.errno if isinstance(e, OSError) else None
    if code == errno.ENOSPC:
        return f"no space left on device while writing {path}"
    if code == errno.EFBIG:
        return f"file size limit exceeded while writing {path} (ulimit -f)"
    if code == getattr(errno, "EDQUOT", None):
        return f"disk quota exceeded while writing {path}"
    if isinstance(e, OSError):
        return f"could not write {path}: {e.strerror or _first_line(e)}"
    return f"could not write {path}: {type(e).__name__}: {_first_line(e)}"


def read_error_message(e: BaseException, path) -> str:
    """One line for a failed read of ``path`` (instead of torch's/pickle's traceback)."""
    if isinstance(e, FileNotFoundError):
        return f"{path}: missing"
    text = _first_line(e)
    if "PytorchStreamReader" in text or isinstance(e, EOFError):  # its first sentence says it all
        return f"{path}: truncated or corrupt (torch cannot read it: {text.split('. ')[0] or type(e).__name__})"
    return f"{path}: corrupt or unreadable ({type(e).__name__}: {text})"


class _Sink:
    """The file torch.save writes into: every write either completes or raises OSError with its errno.
    torch.save into a path (its C++ writer), or into a Python file that accepts a short write (the disk
    filling up mid-write, the file size limit), reports only ``unexpected pos … vs …``; here a short write
    is retried, so the next attempt says why, and the first OSError is kept in case torch replaces it."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view.nbytes:
                n = self.raw.write(view)
                if not n:
                    raise OSError(errno.EIO, "write wrote nothing")
                view = view[n:]
        except OSError as e:
            self.error = self.error or e
            raise
        return memoryview(data).nbytes

    def flush(self):
        self.raw.flush()

    def seek(self, *args):
        return self.raw.seek(*args)

    def tell(self):
        return self.raw.tell()


def _torch_save(obj, path, **kwargs):
    """torch.save whose failure is an OSError with errno when the system said why (see ``_Sink``)."""
    with open(path, "wb", buffering=0) as raw:
        sink = _Sink(raw)
        try:
            torch.save(obj, sink, **kwargs)
        except (OSError, RuntimeError) as e:
            if sink.error is not None and sink.error is not e:
                raise sink.error from e
            raise


def _write_text(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)


def _write_atomic(path: Path, text: str):
    """Readers see the old file or the whole new one (a pointer or a manifest is never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_text(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- manifest

def file_entry(path) -> dict:
    return {"size": os.path.getsize(path), "sha256": file_sha256(path)}


def check_file(tag_dir: Path, name: str, entry: dict) -> str | None:
    """None when ``tag_dir/name`` matches its manifest entry, else one line saying what is wrong."""
    path = tag_dir / name
    try:
        size = os.path.getsize(path)
        if size < entry["size"]:
            return f"{path}: truncated ({size} of {entry['size']} bytes)"
        if size != entry["size"] or file_sha256(path) != entry["sha256"]:
            return f"{path}: checksum mismatch"
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    return None


def _written_with_checksums(meta_file: Path) -> bool:
    """A ``megavac.json`` of the checksummed format (it records the data fingerprint): its folder without a
    manifest is a save killed between the two files, not a checkpoint from before manifests."""
    try:
        return "data_fingerprint" in json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return True  # half-written: certainly not a finished older checkpoint


def read_manifest(tag_dir: Path) -> tuple[str, object]:
    """("ok", files) | ("unverified", why) for a tag written before manifests (it has ``megavac.json``) |
    ("incomplete", why) for a save that did not finish | ("corrupt", why) for an unreadable manifest."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        if (tag_dir / "megavac.json").is_file() and not _written_with_checksums(tag_dir / "megavac.json"):
            return "unverified", f"{tag_dir} has no {MANIFEST} (written before megavac checksummed checkpoints)"
        return "incomplete", f"{tag_dir}: incomplete (no {MANIFEST}: its save did not finish)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return "corrupt", f"{path}: unreadable manifest ({_first_line(e)})"
    return "ok", files


def verify_tag_dir(tag_dir) -> list[str]:
    """Every problem of one tag folder, in one process (for tools; training splits the work over ranks).
    [] means verified; a tag without a manifest is reported as such."""
    tag_dir = Path(tag_dir)
    status, files = read_manifest(tag_dir)
    if status != "ok":
        return [files]
    return [p for name in sorted(files) if (p := check_file(tag_dir, name, files[name]))]


def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files dealt to ranks, largest first to the least loaded: each rank hashes about 1/world of the bytes.
    Deterministic, so every rank computes the same split from the same manifest."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (loads[i], i))
        out[r].append(name)
        loads[r] += sizes[name]
    return out


# ---------------------------------------------------------------- collectives on Python objects

def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    world = _world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- DeepSpeed's file I/O, observed

class _EngineIO:
    """For one ``save_checkpoint``/``load_checkpoint``: wrap the engine's checkpoint engine (DeepSpeed's
    pluggable file I/O, through which it writes and reads every shard, layer file included) to

    - record the files this rank wrote, which this rank then hashes (its own shard is in its page cache);
    - keep the first failed write instead of raising: DeepSpeed's save has barriers after the writes, so a
      rank that raised out of it (disk full on one rank) would leave the others waiting there forever.
      Every rank finishes the save and the failure is agreed on afterwards. The stock engine's write (one
      ``torch.save(state, path)``) is done by ``_torch_save`` (the same records), so the error keeps its errno;
    - name the file a failed read was reading (torch's message does not).
    """

    def __init__(self, engine, error: str | None = None):
        self.ce = engine.checkpoint_engine
        self.written: list[str] = []
        self.error = error  # the first failed write (of this rank, this save)
        self.read_error: str | None = None

    def __enter__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        ce, orig_save, orig_load = self.ce, self.ce.save, self.ce.load
        stock = type(ce).save is TorchCheckpointEngine.save

        def save(state_dict, path, *args, **kwargs):
            if self.error is not None:  # the checkpoint is lost already: write nothing more
                return
            try:
                if stock:
                    _torch_save(state_dict, path, _use_new_zipfile_serialization=ce.zipfile_serialization)
                else:
                    orig_save(state_dict, path, *args, **kwargs)
                self.written.append(str(path))
            except (OSError, RuntimeError) as e:
                self.error = write_error_message(e, path)

        def load(path, *args, **kwargs):
            try:
                return orig_load(path, *args, **kwargs)
            except Exception as e:
                self.read_error = read_error_message(e, path)
                raise ValueError(self.read_error) from e

        self._saved = {k: vars(ce)[k] for k in ("save", "load") if k in vars(ce)}
        ce.save, ce.load = save, load
        return self

    def __exit__(self, *exc):
        for k in ("save", "load"):
            if k in self._saved:
                setattr(self.ce, k, self._saved[k])
            else:
                vars(self.ce).pop(k, None)
        return False


# ---------------------------------------------------------------- the checkpointer

class Checkpointer:
    def __init__(self, save_dir: str, rank: int, keep_last: int, info: dict):
        self.root = Path(save_dir) / "checkpoints"
        self.rank, self.keep_last, self.info = rank, keep_last, info
        self.best_loss = float("inf")
        self.bad: set[str] = set()  # tags that failed verification in this process: never counted as good

    def tag_dir(self, tag: str) -> Path:
        return self.root / tag

    def read_tag(self, name: str) -> str | None:
        p = self.root / name
        try:
            return p.read_text().strip() if p.is_file() else None
        except (OSError, UnicodeDecodeError):
            return None

    def _say(self, msg: str):
        if self.rank == 0:
            print(msg, flush=True)

    def _step_dirs(self) -> list[Path]:
        """Tag folders ``step_N``, oldest first."""
        return sorted((d for d in self.root.glob("step_*") if d.is_dir() and d.name[5:].isdigit()),
                      key=lambda d: int(d.name[5:]))

    # ------------------------------------------------------------ save

    def save(self, engine, step: int, global_state: dict, rank_state: dict, val_loss: float | None):
        """Write every shard, hash it, write the manifest, then point ``latest`` at it: a run killed or
        failing mid-save resumes from the previous complete checkpoint instead of a half-written one."""
        tag = f"step_{step}"
        tag_dir = self.tag_dir(tag)
        is_best = val_loss is not None and val_loss < self.best_loss
        if is_best:
            self.best_loss = val_loss
        self.bad.discard(tag)  # written anew below
        if self.rank == 0:
            # A folder of this step from an earlier attempt (a resumed run saving the same step again) must
            # not keep its manifest and megavac.json while the files under them are replaced.
            if tag_dir.exists():
                shutil.rmtree(tag_dir, ignore_errors=True)
            tag_dir.mkdir(parents=True, exist_ok=True)
        barrier()

        error, mine = None, []
        rank_file = tag_dir / f"megavac_rank{self.rank}.pt"
        try:
            _torch_save({**rank_state, "rng": rng_state()}, rank_file)
            mine.append(str(rank_file))
        except (OSError, RuntimeError) as e:
            error = write_error_message(e, rank_file)
        client = {"megavac": {**global_state, "best_loss": self.best_loss, "step": step}}
        # An exception out of save_checkpoint itself (not one of its writes) leaves the ranks at different
        # points of DeepSpeed's barriers: it is raised at once (the launcher then stops the other ranks).
        io = _EngineIO(engine, error)  # after a failed write of its own, this rank writes nothing more
        try:
            with io:
                engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as e:
            raise CheckpointWriteError(f"{write_error_message(e, tag_dir)}; latest was not moved") from e
        error, hashes = io.error, {}
        if error is None:
            for path in mine + io.written:
                rel = Path(os.path.relpath(path, tag_dir)).as_posix()
                if rel.startswith("../"):  # not part of this tag (nothing DeepSpeed writes today)
                    continue
                try:
                    hashes[rel] = file_entry(path)
                except OSError as e:
                    error = f"could not read back {path} after writing it: {e.strerror or e}"
                    break
        results = _gather((error, hashes))  # also the barrier: every rank's files are on disk after it

        outcome = None
        if self.rank == 0:
            errors = [e for e, _ in results if e]
            outcome = f"{errors[0]}; latest was not moved" if errors else \
                self._commit(tag, step, val_loss, is_best, results)
            if errors:
                self._discard(tag_dir)
        outcome = _broadcast(outcome)
        if outcome:
            raise CheckpointWriteError(outcome)
        return tag

    def _commit(self, tag: str, step: int, val_loss, is_best: bool, results: list) -> str | None:
        """Rank 0, after every rank's files are on disk and hashed: megavac.json, the manifest, the pointers,
        pruning. Returns None, or the one-line error (the tag folder is then removed unless latest moved)."""
        tag_dir, path, moved = self.tag_dir(tag), None, False
        try:
            files = {}
            for _, hashes in results:
                files.update(hashes)
            path = tag_dir / "megavac.json"
            _write_text(path, json.dumps({**self.info, "step": step, "val_loss": val_loss, "tag": tag}, indent=2))
            for p in sorted(tag_dir.rglob("*")):  # what no rank reported (megavac.json; anything DeepSpeed
                rel = p.relative_to(tag_dir).as_posix()  # wrote around its checkpoint engine)
                if p.is_file() and rel not in files and rel != MANIFEST and not p.name.startswith("."):
                    try:
                        files[rel] = file_entry(p)
                    except OSError as e:
                        self._discard(tag_dir)
                        return f"could not read back {p} after writing it: {e.strerror or e}; latest was not moved"
            path = tag_dir / MANIFEST
            manifest = {"format": MANIFEST_FORMAT, "tag": tag, "step": step, "world_size": len(results),
                        "algorithm": "sha256", "files": dict(sorted(files.items()))}
            _write_atomic(path, json.dumps(manifest, indent=1))
            path = self.root / "latest"
            _write_atomic(path, tag)
            moved = True
            if is_best:
                path = self.root / "best"
                _write_atomic(path, tag)
        except OSError as e:
            if not moved:
                self._discard(tag_dir)
            return write_error_message(e, path) + ("" if moved else "; latest was not moved")
        self._prune()
        return None

    def _discard(self, tag_dir: Path):
        """Remove a tag folder whose save failed: it frees the space, and nothing half-written is left."""
        shutil.rmtree(tag_dir, ignore_errors=True)

    def _prune(self):
        """Keep ``best``, ``latest``, the newest ``keep_last`` complete step checkpoints and, whatever
        ``keep_last`` says, the newest one with a manifest (complete when written, and not found damaged
        in this run). Folders found damaged on resume are neither counted nor deleted (the user was told
        and may want to look at them); incomplete folders (a killed save) are deleted."""
        keep = {self.read_tag("best"), self.read_tag("latest")}
        steps = self._step_dirs()
        manifested = [d for d in steps if (d / MANIFEST).is_file() and d.name not in self.bad]
        complete = [d for d in steps if d.name not in self.bad and
                    ((d / MANIFEST).is_file() or (d / "megavac.json").is_file())]
        keep |= {d.name for d in complete[-self.keep_last:]} if self.keep_last > 0 else set()
        keep |= {manifested[-1].name} if manifested else set()
        keep |= self.bad
        for d in steps:
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------ verify and resume

    def _plan(self) -> dict:
        """Rank 0: what ``latest`` names (or what is wrong with it) and the other tags, newest first."""
        latest = self.root / "latest"
        named, problem = None, None
        if latest.exists():
            try:
                tag = latest.read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                tag, problem = None, f"{latest}: unreadable ({_first_line(e)})"
            if tag is None:
                pass
            elif not tag:
                problem = f"{latest} is empty"
            elif "/" in tag or tag in (".", "..") or len(tag) > 200:
                problem = f"{latest} names {tag[:80]!r}, which is not a checkpoint tag"
            elif not self.tag_dir(tag).is_dir():
                problem = f"{latest} names {tag}, which does not exist"
            else:
                named = tag
        others = [d.name for d in reversed(self._step_dirs()) if d.name != named]
        return {"named": named, "problem": problem, "latest_exists": latest.exists(), "others": others}

    def _verify(self, tag: str) -> tuple[str, list[str]]:
        """Collective: ("verified", []) | ("unverified", [why]) | ("incomplete"/"corrupt", problems).
        Rank 0 reads the manifest; the files are split over the ranks by size; every rank gets the verdict."""
        tag_dir = self.tag_dir(tag)
        status, files = _broadcast(read_manifest(tag_dir) if self.rank == 0 else None)
        if status != "ok":
            return status, [files]
        rank, world = _world()
        mine = _shares({n: e["size"] for n, e in files.items()}, world)[rank]
        problems = [p for n in mine if (p := check_file(tag_dir, n, files[n]))]
        problems = sorted(p for ps in _gather(problems) for p in ps)
        return ("corrupt" if problems else "verified"), problems

    def _report(self, problems: list[str]):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        self._say(f"--resume: {problems[0]}{more}")

    def choose_resume_tag(self) -> str | None:
        """Collective (every rank calls it): the tag to resume from — ``latest`` when it verifies, else the
        newest that does, saying so — or None when there is nothing to resume. Raises ValueError when a
        ``latest`` exists but no checkpoint verifies. For callers that must know the tag before the engine
        exists (its layout decides how the engine is built); pass it on to ``load_latest``."""
        return self._choose()

    def _choose(self) -> str | None:
        plan = _broadcast(self._plan() if self.rank == 0 else None)
        first = plan["problem"]
        if plan["named"]:
            status, problems = self._verify(plan["named"])
            if status == "verified":
                return plan["named"]
            if status == "unverified":
                self._say(f"warning: {problems[0]}: loading it unverified")
                return plan["named"]
            self.bad.add(plan["named"])
            first = problems[0]
            self._report(problems)
        elif first:
            self._say(f"--resume: {first}")
        for tag in plan["others"]:
            status, problems = self._verify(tag)
            if status == "verified":
                why = "the newest checkpoint that verifies" if plan["latest_exists"] else \
                    f"the newest checkpoint that verifies ({self.root / 'latest'} does not exist)"
                self._say(f"--resume: falling back to {tag} ({self.tag_dir(tag)}), {why}")
                return tag
            if status == "unverified":
                self._say(f"--resume: not falling back to {tag}: {problems[0]}")
                continue
            self.bad.add(tag)
            self._report(problems)
        if plan["latest_exists"]:
            raise ValueError(f"--resume: no checkpoint in {self.root} verifies; {first}")
        return None

    def _check_layout(self, tag_dir: Path):
        """A different layout would fail deep inside DeepSpeed, or resume inexactly."""
        meta_file = tag_dir / "megavac.json"
        if not meta_file.is_file():
            return
        try:
            saved = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(read_error_message(e, meta_file)) from e
        for key, default in (("world_size", None), ("pipeline_stages", 1)):
            have, want = saved.get(key, default), self.info.get(key, default)
            if have is not None and have != want:
                raise ValueError(f"--resume: {meta_file} was written with {key}={have}, this run has {key}={want}; "
                                 "resume with the same layout (the data order and optimizer shards depend on it)")

    def _load_rank_state(self, tag_dir: Path) -> dict:
        rank_file = tag_dir / f"megavac_rank{self.rank}.pt"
        if not rank_file.is_file():
            raise ValueError(f"{rank_file} is missing: the checkpoint was written by fewer ranks than this run has")
        try:
            state = torch.load(rank_file, weights_only=False)
        except Exception as e:  # UnpicklingError, torch's reader errors, EOFError, ...: one line naming the file
            raise ValueError(read_error_message(e, rank_file)) from e
        if not isinstance(state, dict) or not {"rng", "sampler"} <= state.keys():
            raise ValueError(f"{rank_file}: not a megavac rank state (no sampler position and RNG states)")
        return state

    def load_latest(self, engine, tag: str | None = None) -> tuple[dict, dict] | None:
        """Restore engine state from ``latest`` (or the newest checkpoint that verifies when ``latest`` is
        damaged; or ``tag``, already chosen by ``choose_resume_tag``); returns (global_state, this rank's
        state) or None when there is nothing to resume."""
        tag = tag or self._choose()
        if tag is None:
            return None
        tag_dir = self.tag_dir(tag)
        self._check_layout(tag_dir)
        # This rank's state before DeepSpeed touches the engine; a bad file on any rank stops every rank
        # with the same line (instead of one rank failing while the others wait in DeepSpeed's collectives).
        rank_state, error = None, None
        try:
            rank_state = self._load_rank_state(tag_dir)
        except ValueError as e:
            error = str(e)
        errors = [e for e in _gather(error) if e]
        if errors:
            raise ValueError(errors[0])
        if not any(tag_dir.glob("*mp_rank_*_model_states.pt")):  # DeepSpeed asserts on no file, unnamed
            raise ValueError(f"{tag_dir}/mp_rank_00_model_states.pt: missing (the checkpoint has no model "
                             "states file)")
        # A read failing now (an unverified tag, or a file changed since it verified) is not a reason to
        # fall back: the engine may be half-loaded. It is one line naming the file.
        io = _EngineIO(engine)
        try:
            with io:
                path, client = engine.load_checkpoint(str(self.root), tag=tag)
        except Exception as e:
            if io.read_error:
                raise ValueError(io.read_error) from e
            raise ValueError(f"{tag_dir}: DeepSpeed could not load it ({type(e).__name__}: "
                             f"{_first_line(e) or 'no message'})") from e
        if path is None or client is None or "megavac" not in client:
            raise ValueError(f"could not load checkpoint {tag_dir} (DeepSpeed found no client state in it)")
        set_rng_state(rank_state["rng"])
        state = client["megavac"]
        self.best_loss = state["best_loss"]
        return state, rank_state
