"""Shared fixtures: a small prepared synthetic corpus and helpers to run the real launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megavac.distributed import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]



def shared_data() -> Path | None:
    """The real corpora beside the project (or $MEGAVAC_SHARED_DATA), if present."""
    p = Path(os.environ.get("MEGAVAC_SHARED_DATA", REPO.parent / "shared" / "data"))
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """Six synthetic languages from four families, 60..3000 training pairs, prepared with vocab 600."""
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.synthetic import build_languages, generate_corpus

    root = tmp_path_factory.mktemp("synthetic")
    langs = build_languages(0)
    families = {}
    for lang in langs:
        families.setdefault(lang.family.name, []).append(lang.code)
    codes = [c for fam in list(families.values())[:4] for c in fam[:2]][:6]
    sizes = dict(zip(codes, [3000, 1500, 600, 300, 120, 60]))
    generate_corpus(root / "corpus", seed=0, langs=codes, sizes=sizes, dev_size=40, test_size=30)
    prepare(PrepareConfig(corpus=root / "corpus", out=root / "prepared", vocab_size=600, workers=1, quiet=True))
    return root / "prepared"


def write_two_pair_corpus(root: Path) -> Path:
    """A plain-layout corpus in ``root/corpus``: pairs xa (120 train lines, dev files present but empty)
    and xb (120 train, 10 dev lines), from the synthetic generator's first two families."""
    import random

    from data_pipeline.synthetic import build_languages, generate_pairs

    for i, code in enumerate(("xa", "xb")):
        pairs = list(generate_pairs(build_languages(0)[i * 5], 130, random.Random(i), set()))
        d = root / "corpus" / f"{code}-en"
        d.mkdir(parents=True)
        for split, rows in (("train", pairs[:120]), ("dev", pairs[120:] if code == "xb" else [])):
            (d / f"{split}.{code}").write_text("".join(x + "\n" for _, x in rows), encoding="utf-8")
            (d / f"{split}.en").write_text("".join(e + "\n" for e, _ in rows), encoding="utf-8")
    return root / "corpus"


def launch_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    # pytest.ini's `pythonpath = . tests` for the launched scripts too: they run this checkout's megavac
    # (as the in-process tests do, whatever else is installed), and helpers import tests/reference_methods.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def deepspeed_cmd(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), str(REPO / "launch" / "train.py"), *map(str, args)]


def run(cmd, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def train_losses(save_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last record wins: a resumed run rewrites steps)."""
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out
