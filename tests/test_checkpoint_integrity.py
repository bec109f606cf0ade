"""Checkpoint integrity: checksums written with every checkpoint and verified on resume, fallback to the
newest checkpoint that verifies, errors that name the file, and a full disk while saving.

Each case is one users hit. Before: random bytes in a ZeRO shard resumed silently (nan, then a `latest`
with non-finite weights, and `--keep-last` deleted the last intact checkpoint); a truncated shard, an empty
`latest`, a missing model-states file or a garbage per-rank file gave torch/DeepSpeed tracebacks; a full
disk gave `unexpected pos … vs …`. Real runs: `launch/train.py` on 1 rank, the deepspeed launcher on 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, deepspeed_cmd, launch_env, run, train_losses

COMMON = ["--ds_config", "ds_configs/zero2.json", "--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3",
          "--warmup-steps", "4", "--log-interval", "1", "--lang-log-interval", "4", "--valid-interval", "1000",
          "--valid-max-tokens", "2048", "--save-interval", "2"]
SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def args(data, save, *extra):
    return ["--data-dir", data, "--save-dir", save, *COMMON, *map(str, extra)]


def train(data, save, *extra, check=True):
    return run([sys.executable, "launch/train.py", *args(data, save, *extra)], check=check)


@pytest.fixture(scope="module")
def trained(small_synthetic, tmp_path_factory) -> Path:
    """1 rank, 4 steps, checkpoints step_2 and step_4 (latest); each test damages a copy."""
    save = tmp_path_factory.mktemp("integrity") / "run"
    train(small_synthetic, save, "--max-steps", 4, "--keep-last", 2)
    return save


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def overwrite_middle(path: Path, n: int = 4096):
    """Random bytes over the middle of a file (same size): what the user's disk did."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(min(n, size // 2)))


def truncate_half(path: Path):
    os.truncate(path, path.stat().st_size // 2)


def all_verify(root: Path):
    from megavac.train.checkpoints import verify_tag_dir

    return {d.name: verify_tag_dir(d) for d in root.glob("step_*")}


# ---------------------------------------------------------------- the manifest


def test_every_checkpoint_has_a_complete_manifest(trained):
    from megavac.train.checkpoints import MANIFEST, file_sha256, verify_tag_dir

    root = trained / "checkpoints"
    assert (root / "latest").read_text() == "step_4"
    for tag in ("step_2", "step_4"):
        d = root / tag
        manifest = json.loads((d / MANIFEST).read_text())
        on_disk = {p.name for p in d.iterdir() if p.name != MANIFEST}
        assert set(manifest["files"]) == on_disk == {"megavac.json", "megavac_rank0.pt", MODEL, SHARD}
        assert manifest["step"] == int(tag[5:]) and manifest["world_size"] == 1
        for name, entry in manifest["files"].items():
            assert entry == {"size": (d / name).stat().st_size, "sha256": file_sha256(d / name)}
        assert verify_tag_dir(d) == []


@pytest.mark.parametrize("ds", ["ds_configs/zero1.json", "ds_configs/zero3.json", "ds_configs/zero3_bf16.json"])
def test_each_zero_stage_writes_a_manifest_of_every_file_and_resumes_through_it(small_synthetic, tmp_path, ds):
    from megavac.train.checkpoints import MANIFEST, verify_tag_dir

    save = tmp_path / "run"
    train(small_synthetic, save, "--max-steps", 2, "--ds_config", ds)
    d = save / "checkpoints" / "step_2"
    files = json.loads((d / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in d.iterdir() if p.name != MANIFEST} and verify_tag_dir(d) == []
    assert any(n.endswith("optim_states.pt") for n in files) and any(n.endswith("model_states.pt") for n in files)
    p = train(small_synthetic, save, "--max-steps", 3, "--ds_config", ds, "--resume")
    assert "resumed from step 2" in p.stdout and "warning" not in p.stdout


# ---------------------------------------------------------------- damaged latest: fall back


def damage_shard_bytes(root):
    overwrite_middle(root / "step_4" / SHARD)
    return f"{root / 'step_4' / SHARD}: checksum mismatch", "step_2"


def damage_shard_truncated(root):
    truncate_half(root / "step_4" / SHARD)
    return f"{root / 'step_4' / SHARD}: truncated (", "step_2"


def damage_model_missing(root):
    (root / "step_4" / MODEL).unlink()
    return f"{root / 'step_4' / MODEL}: missing", "step_2"


def damage_rank_file(root):
    p = root / "step_4" / "megavac_rank0.pt"
    p.write_bytes(os.urandom(p.stat().st_size))
    return f"{p}: checksum mismatch", "step_2"


def damage_latest_empty(root):
    (root / "latest").write_text("")
    return f"{root / 'latest'} is empty", "step_4"


def damage_latest_names_missing_tag(root):
    (root / "latest").write_text("step_9")
    return f"{root / 'latest'} names step_9, which does not exist", "step_4"


def damage_save_cut_short(root):
    """Killed mid-save: the folder holds files but no manifest; `latest` still names it (a rerun of a
    step whose earlier copy was being replaced)."""
    (root / "step_4" / "checksums.json").unlink()
    (root / "step_4" / "megavac.json").unlink()
    return f"{root / 'step_4'}: incomplete (no checksums.json", "step_2"


def damage_latest_deleted(root):
    """Killed between the manifest and `latest` moving: the newest complete checkpoint is used."""
    (root / "latest").unlink()
    return "does not exist)", "step_4"


@pytest.mark.parametrize("damage", [damage_shard_bytes, damage_shard_truncated, damage_model_missing,
                                    damage_rank_file, damage_latest_empty, damage_latest_names_missing_tag,
                                    damage_save_cut_short, damage_latest_deleted], ids=lambda f: f.__name__[7:])
def test_damaged_latest_falls_back_to_the_newest_checkpoint_that_verifies(trained, small_synthetic, tmp_path,
                                                                          damage):
    save = copy_run(trained, tmp_path / "run")
    root = save / "checkpoints"
    said, fallback = damage(root)
    # --keep-last 1: the run that resumed the damaged checkpoint went on to delete the intact one.
    p = train(small_synthetic, save, "--max-steps", 6, "--keep-last", 1, "--resume")
    lines = p.stdout.splitlines()
    assert any(said in line for line in lines), p.stdout[-3000:]
    assert f"--resume: falling back to {fallback} ({root / fallback}), the newest checkpoint that verifies" in p.stdout
    start = int(fallback[5:])
    assert f"resumed from step {start}" in p.stdout
    # Exact resume from the fallback: the steps after it repeat the original run's losses.
    before, after = train_losses(trained), train_losses(save)
    for step in range(start + 1, 5):
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7), (step, before, after)
    assert sorted(after) == list(range(1, 7))
    assert (root / "latest").read_text() == "step_6"
    assert all_verify(root)["step_6"] == []  # and what is left of step_4 was rewritten by this run, or pruned
    assert all(v == [] for v in all_verify(root).values()), all_verify(root)


# ---------------------------------------------------------------- nothing verifies: refuse in one line


@pytest.mark.parametrize("damage,said", [
    (lambda d: truncate_half(d / SHARD), f"{SHARD}: truncated ("),
    (lambda d: overwrite_middle(d / "megavac_rank0.pt", 256), "megavac_rank0.pt: checksum mismatch"),
    (lambda d: (d / MODEL).unlink(), f"{MODEL}: missing"),
], ids=["truncated-shard", "garbage-rank-file", "missing-model-states"])
def test_damaged_only_checkpoint_is_refused_naming_the_file(trained, small_synthetic, tmp_path, damage, said):
    save = copy_run(trained, tmp_path / "run")
    root = save / "checkpoints"
    shutil.rmtree(root / "step_2")
    damage(root / "step_4")
    p = train(small_synthetic, save, "--max-steps", 6, "--resume", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    error = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(error) == 1 and f"no checkpoint in {root} verifies" in error[0], p.stderr[-2000:]
    assert f"{root / 'step_4'}/{said}" in error[0]
    assert (root / "latest").read_text() == "step_4" and (root / "step_4").is_dir()  # nothing touched


def test_latest_naming_a_missing_tag_with_nothing_to_fall_back_on_is_refused(trained, small_synthetic, tmp_path):
    save = copy_run(trained, tmp_path / "run")
    root = save / "checkpoints"
    for tag in ("step_2", "step_4"):
        shutil.rmtree(root / tag)
    (root / "latest").write_text("step_4")
    p = train(small_synthetic, save, "--max-steps", 6, "--resume", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"error: --resume: no checkpoint in {root} verifies; {root / 'latest'} names step_4, which does not " \
           "exist" in p.stderr


# ---------------------------------------------------------------- checkpoints of older runs (no manifest)


def strip_manifests(root: Path):
    """Make the run's checkpoints look written before checksums existed: no manifest, and a megavac.json
    without the keys of the checksummed format (else a missing manifest means a save that did not finish)."""
    for m in root.glob("step_*/checksums.json"):
        m.unlink()
        meta_file = m.parent / "megavac.json"
        meta = json.loads(meta_file.read_text())
        for key in ("data_fingerprint", "settings"):
            meta.pop(key, None)
        meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,said", [
    (None, None),
    (lambda d: truncate_half(d / SHARD), f"{SHARD}: truncated or corrupt (torch cannot read it: "
                                         "PytorchStreamReader failed reading zip archive"),
    (lambda d: (d / "megavac_rank0.pt").write_bytes(b"\x80\x02garbage" * 50),
     "megavac_rank0.pt: corrupt or unreadable"),
    (lambda d: (d / MODEL).unlink(), f"{MODEL}: missing"),
], ids=["intact", "truncated-shard", "garbage-rank-file", "missing-model-states"])
def test_checkpoint_without_manifest_loads_with_a_warning_and_read_errors_name_the_file(
        trained, small_synthetic, tmp_path, damage, said):
    save = copy_run(trained, tmp_path / "run")
    root = save / "checkpoints"
    strip_manifests(root)
    warning = f"warning: {root / 'step_4'} has no checksums.json (written before megavac checksummed " \
              "checkpoints): loading it unverified"
    if damage is None:
        p = train(small_synthetic, save, "--max-steps", 6, "--resume")
        assert warning in p.stdout and "resumed from step 4" in p.stdout
        assert (root / "step_6" / "checksums.json").is_file()  # new checkpoints carry one
        return
    damage(root / "step_4")
    p = train(small_synthetic, save, "--max-steps", 6, "--resume", check=False)
    assert warning in p.stdout
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    error = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith(f"error: {root / 'step_4'}/{said}"), p.stderr[-2000:]


# ---------------------------------------------------------------- pruning


def test_pruning_keeps_the_newest_checkpoint_with_a_manifest_and_damaged_ones(tmp_path):
    """latest names a checkpoint without a manifest (an older run's); --keep-last 1 still keeps step_2,
    the newest that verified; step_8 (found damaged on resume) is kept for inspection, not counted;
    the folder of a killed save (no manifest, no megavac.json) goes."""
    from megavac.train.checkpoints import MANIFEST, Checkpointer

    ck = Checkpointer(str(tmp_path), rank=0, keep_last=1, info={})
    for tag, files in (("step_2", [MANIFEST, "megavac.json"]), ("step_4", ["megavac.json"]), ("step_6", ["x.pt"]),
                       ("step_8", [MANIFEST, "megavac.json"])):
        (ck.root / tag).mkdir(parents=True)
        for f in files:
            (ck.root / tag / f).write_text("{}")
    (ck.root / "latest").write_text("step_4")
    ck.bad.add("step_8")
    ck._prune()
    assert sorted(d.name for d in ck.root.glob("step_*")) == ["step_2", "step_4", "step_8"]


# ---------------------------------------------------------------- two ranks


def test_two_ranks_damaged_rank_file_falls_back_and_resumes_exactly(small_synthetic, tmp_path):
    save = tmp_path / "run"
    run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 4, "--keep-last", 2)))
    root = save / "checkpoints"
    manifest = json.loads((root / "step_4" / "checksums.json").read_text())
    assert manifest["world_size"] == 2
    assert {"megavac_rank0.pt", "megavac_rank1.pt", SHARD, "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            MODEL} <= set(manifest["files"])
    before = train_losses(save)
    bad = root / "step_4" / "megavac_rank1.pt"
    bad.write_bytes(os.urandom(bad.stat().st_size))
    p = run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 6, "--keep-last", 1, "--resume")))
    assert f"--resume: {bad}: checksum mismatch" in p.stdout
    assert p.stdout.count(f"--resume: {bad}: checksum mismatch") == 1  # said once, by rank 0
    assert "falling back to step_2" in p.stdout and "resumed from step 2" in p.stdout
    after = train_losses(save)
    assert all(after[s] == pytest.approx(before[s], rel=1e-6, abs=1e-7) for s in (3, 4)), (before, after)
    assert (root / "latest").read_text() == "step_6" and all(v == [] for v in all_verify(root).values())


def test_pipeline_manifest_covers_the_layer_files_and_a_damaged_one_falls_back(small_synthetic, tmp_path):
    """2 pipeline stages: the layer files are written by the stages that hold the layers; the manifest
    lists every file of the folder, and a damaged layer file is caught like a shard."""
    from megavac.train.checkpoints import MANIFEST, verify_tag_dir

    save = tmp_path / "run"
    pipe = ["--ds_config", "ds_configs/pipeline.json", "--keep-last", 2]
    run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 4, *pipe)))
    root = save / "checkpoints"
    for tag in ("step_2", "step_4"):
        files = json.loads((root / tag / MANIFEST).read_text())["files"]
        assert set(files) == {p.name for p in (root / tag).iterdir() if p.name != MANIFEST}
        assert sum(n.startswith("layer_") for n in files) == 7 and verify_tag_dir(root / tag) == []
    before = train_losses(save)
    layer = root / "step_4" / "layer_03-model_states.pt"
    overwrite_middle(layer, 512)
    p = run(deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 6, "--resume", *pipe)))
    assert f"--resume: {layer}: checksum mismatch" in p.stdout and "resumed from step 2" in p.stdout
    after = train_losses(save)
    assert all(after[s] == pytest.approx(before[s], rel=1e-6) for s in (3, 4)), (before, after)


# ---------------------------------------------------------------- a full disk while saving

# Runs launch/train.py with a file size limit (RLIMIT_FSIZE, no root needed): a write past it fails with
# EFBIG, as a full disk fails with ENOSPC, in the middle of torch.save. SIGXFSZ would kill the process
# instead: ignored here, as it is by the runs that hit the limit with an error. With FSIZE_AT_STEP the
# limit is set just before that checkpoint (DeepSpeed's CPU all-reduce maps a 66 MB file at start-up).
# After an error the rank releases DeepSpeed's /dev/shm buffers as a finished run does.
FSIZE_WRAPPER = '''
import os, resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def limit():
    if os.environ.get("FSIZE_RANK") in (None, os.environ.get("RANK", "0")):
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE_LIMIT"]), resource.RLIM_INFINITY))
at = os.environ.get("FSIZE_AT_STEP")
if at is None:
    limit()
else:
    from megavac.train import checkpoints
    save = checkpoints.Checkpointer.save
    def limited_save(self, engine, step, *a, **k):
        if step >= int(at):
            limit()
        return save(self, engine, step, *a, **k)
    checkpoints.Checkpointer.save = limited_save
sys.argv = [os.environ["WRAPPED_SCRIPT"], *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    from megavac.pergrad.ds_adapter import release_shm_buffers
    release_shm_buffers(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                        int(os.environ.get("LOCAL_RANK", 0)))
'''


def run_limited(cmd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=launch_env(WRAPPED_SCRIPT=str(REPO / "launch" / "train.py"), FSIZE_LIMIT=str(512 << 10),
                                         **env))


def test_file_size_limit_while_saving_names_the_file_and_keeps_latest(trained, small_synthetic, tmp_path):
    """1 rank resuming step_2 under a 512 KiB file size limit: the step-4 model states (1 MB) cannot be
    written. The error says so, naming the file; latest stays step_2 and no step_4 folder is left."""
    save = copy_run(trained, tmp_path / "run")
    root = save / "checkpoints"
    shutil.rmtree(root / "step_4")
    (root / "latest").write_text("step_2")
    wrapper = tmp_path / "fsize.py"
    wrapper.write_text(FSIZE_WRAPPER)
    p = run_limited([sys.executable, wrapper, *args(small_synthetic, save, "--max-steps", 4, "--resume")])
    assert p.returncode != 0
    assert f"file size limit exceeded while writing {root / 'step_4' / MODEL} (ulimit -f); latest was not moved" \
           in p.stderr, p.stderr[-3000:]
    assert "unexpected pos" not in p.stderr
    assert (root / "latest").read_text() == "step_2" and not (root / "step_4").exists()
    # Space back: the same command continues from step_2.
    out = train(small_synthetic, save, "--max-steps", 4, "--resume")
    assert "resumed from step 2" in out.stdout and (root / "latest").read_text() == "step_4"


def test_two_ranks_one_cannot_write_its_shard_every_rank_stops_with_the_same_line(small_synthetic, tmp_path):
    """Only rank 1 hits the limit, at the step-4 checkpoint (its optimizer shard, 1.6 MB): rank 0 wrote its
    files. Both ranks stop with the same line (no rank left waiting in a barrier), latest stays step_2."""
    save = tmp_path / "run"
    root = save / "checkpoints"
    wrapper = tmp_path / "fsize.py"
    wrapper.write_text(FSIZE_WRAPPER)
    cmd = deepspeed_cmd(2, *args(small_synthetic, save, "--max-steps", 6))
    cmd[cmd.index(str(REPO / "launch" / "train.py"))] = str(wrapper)
    p = run_limited(cmd, FSIZE_RANK="1", FSIZE_AT_STEP="4")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    line = f"file size limit exceeded while writing {root / 'step_4' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}"
    assert all(line in x for x in out.splitlines() if "CheckpointWriteError:" in x or x.startswith("error: ")), \
        out[-4000:]
    assert out.count(line) >= 2, out[-4000:]  # rank 0 and rank 1
    assert (root / "latest").read_text() == "step_2" and not (root / "step_4").exists()
    assert all_verify(root) == {"step_2": []}


def test_write_errors_keep_their_errno_on_a_full_device(tmp_path):
    """torch.save into a path reports a full device as `unexpected pos … vs …`; megavac's writes keep
    ENOSPC (here /dev/full, a real ENOSPC from the kernel) and say it in one line."""
    import errno

    import torch

    from megavac.train.checkpoints import _torch_save, write_error_message

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    state = {"w": torch.randn(100_000)}
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save(state, "/dev/full")  # what users saw
    for obj in (state, {"small": 1}):  # one big write, and one that only fails when flushed
        with pytest.raises(OSError) as e:
            _torch_save(obj, "/dev/full")
        assert e.value.errno == errno.ENOSPC
        assert write_error_message(e.value, "/dev/full") == "no space left on device while writing /dev/full"
    ok = tmp_path / "ok.pt"
    _torch_save(state, ok)
    assert torch.equal(torch.load(ok)["w"], state["w"])
