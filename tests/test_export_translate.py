"""What a user runs after training, on the checkpoints of a real (short) training run: checkpoint averaging,
the export file, launch/translate.py, and the data-fingerprint refusal of evaluation.

One tiny run (6 steps, checkpoints at 2, 4, 6) is shared by the module; the same corpus prepared again with
another SentencePiece seed (same vocabulary size, same tag ids, other ids for the same text) stands for the
user report: such a data dir gave BLEU 0.24 instead of 91.8 with exit 0.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, launch_env, run
from megavac.evaluation.average import average_checkpoints, averaged_model, select_tags
from megavac.evaluation.consolidate import load_model, load_model_from_checkpoint
from megavac.evaluation.export import (FORMAT, FORMAT_VERSION, build_export, load_export, load_translator,
                                       pick_task, read_lines, save_export, translate_stream)
from megavac.fingerprint import data_fingerprint

TRAIN = ["--ds_config", "ds_configs/zero2.json", "--model", "tiny", "--max-tokens", "1024", "--lr", "2e-3",
         "--warmup-steps", "4", "--log-interval", "1", "--lang-log-interval", "4", "--valid-interval", "1000",
         "--valid-max-tokens", "2048", "--max-steps", "6", "--save-interval", "2", "--keep-last", "5"]
QUICK = ["--beam", "2", "--max-tokens", "2000", "--device", "cpu"]  # evaluation and translation alike


@pytest.fixture(scope="module")
def ckpts(small_synthetic, tmp_path_factory):
    """checkpoints/ root of a real 1-rank ZeRO-2 run with step_2, step_4, step_6, each megavac.json carrying
    the data fingerprint (written here when the trainer does not write it yet)."""
    save = tmp_path_factory.mktemp("run")
    run([sys.executable, "launch/train.py", "--data-dir", small_synthetic, "--save-dir", save, *TRAIN])
    root = save / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_2", "step_4", "step_6"]
    for tag in ("step_2", "step_4", "step_6"):
        f = root / tag / "megavac.json"
        meta = json.loads(f.read_text())
        if meta.get("data_fingerprint") is None:
            meta["data_fingerprint"] = data_fingerprint(small_synthetic, meta["langs"])
            f.write_text(json.dumps(meta, indent=2))
    return root


@pytest.fixture(scope="module")
def reprepared(small_synthetic, tmp_path_factory):
    """The same corpus prepared again with the same vocabulary size but another SentencePiece seed."""
    from data_pipeline.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("again") / "prepared"
    prepare(PrepareConfig(corpus=small_synthetic.parent / "corpus", out=out, vocab_size=600, workers=1, quiet=True,
                          seed=1))
    a, b = (json.loads((d / "meta.json").read_text()) for d in (small_synthetic, out))
    assert a["vocab_size"] == b["vocab_size"] and [t["tag_id"] for t in a["tasks"]] == [t["tag_id"] for t in b["tasks"]]
    assert (small_synthetic / "spm.model").read_bytes() != (out / "spm.model").read_bytes()
    return out


@pytest.fixture(scope="module")
def exports(ckpts, tmp_path_factory):
    """fp32 and bf16 exports of step_6 and the fp32 average of step_4 and step_6, written by the CLIs."""
    d = tmp_path_factory.mktemp("exports")
    out = {"fp32": d / "m.pt", "bf16": d / "m_bf16.pt", "avg": d / "avg.pt"}
    p = run([sys.executable, "launch/export.py", "--checkpoint", ckpts, "--tag", "step_6", "--out", out["fp32"]])
    assert f"wrote {out['fp32']}" in p.stdout and "from step_6" in p.stdout
    run([sys.executable, "launch/export.py", "--checkpoint", ckpts / "step_6", "--out", out["bf16"], "--dtype", "bf16"])
    p = run([sys.executable, "launch/average.py", "--checkpoint", ckpts, "--last", "2", "--out", out["avg"]])
    assert "average of step_4, step_6" in p.stdout
    return out


def weights(path, tag=None) -> dict[str, torch.Tensor]:
    return load_model(path, tag)[0].state_dict()


def evaluate_cli(out, *args, check=True):
    return run([sys.executable, "launch/evaluate.py", *args, *QUICK, "--out", out], check=check)


def translate_cli(*args, stdin: str = "", check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "launch/translate.py", *map(str, args)], cwd=REPO, env=launch_env(),
                       input=stdin.encode("utf-8"), capture_output=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr.decode()[-3000:]
    return p


def task_of(data, name):
    return next(t for t in json.loads((data / "meta.json").read_text())["tasks"] if t["name"] == name)


# ---------------------------------------------------------------- averaging


def test_average_is_the_elementwise_mean_of_consolidated_weights(ckpts, exports):
    a, b = (load_model_from_checkpoint(ckpts, t)[0].state_dict() for t in ("step_4", "step_6"))
    mean, metas = average_checkpoints(ckpts, ["step_4", "step_6"])
    assert [m["tag"] for m in metas] == ["step_4", "step_6"] and mean.keys() == a.keys()
    for k in a:
        assert mean[k].dtype == torch.float32
        assert torch.equal(mean[k], (a[k] + b[k]) / 2), k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the two checkpoints differ

    one, _ = average_checkpoints(ckpts, ["step_6"])
    assert all(torch.equal(one[k], b[k]) for k in b)  # averaging one checkpoint is that checkpoint

    # launch/average.py --last 2 wrote the same mean, with the provenance of both checkpoints.
    exp = load_export(exports["avg"])
    assert all(torch.equal(exp["state_dict"][k], mean[k]) for k in mean)
    prov = exp["provenance"]
    assert prov["averaged"] == 2 and [(c["tag"], c["step"]) for c in prov["checkpoints"]] == [("step_4", 4),
                                                                                              ("step_6", 6)]
    assert prov["checkpoints"][1]["dir"] == str((ckpts / "step_6").resolve())
    model, meta, state = averaged_model(ckpts, tags="step_4,latest")  # latest -> step_6
    assert meta["steps"] == [4, 6] and meta["tag"] == "avg2_step_6"
    assert all(torch.equal(v, mean[k]) for k, v in model.state_dict().items())


def test_average_selection_errors(ckpts):
    assert select_tags(ckpts, last=3) == ["step_2", "step_4", "step_6"]
    assert select_tags(ckpts, tags="best, step_2") == [(ckpts / "best").read_text().strip(), "step_2"]
    with pytest.raises(ValueError, match=r"last 4 checkpoints: .* has 3 \(step_2, step_4, step_6\)"):
        select_tags(ckpts, last=4)
    with pytest.raises(ValueError, match=r"\['step_6'\] named more than once"):
        select_tags(ckpts, tags="step_6,latest")
    with pytest.raises(ValueError, match="step_5"):
        select_tags(ckpts, tags="step_5")
    with pytest.raises(ValueError, match="is one checkpoint .* takes the checkpoint root"):
        select_tags(ckpts / "step_6", last=1)
    p = run([sys.executable, "launch/average.py", "--checkpoint", ckpts, "--last", "9", "--out", ckpts / "x.pt"],
            check=False)
    assert p.returncode == 1 and "average.py: error: cannot average the last 9" in p.stderr
    assert "Traceback" not in p.stderr and not (ckpts / "x.pt").exists()


# ---------------------------------------------------------------- export


def test_export_round_trips_fp32_exactly_and_bf16_within_rounding(ckpts, exports, small_synthetic):
    ref = weights(ckpts, "step_6")
    fp32, bf16 = weights(exports["fp32"]), weights(exports["bf16"])
    assert fp32.keys() == bf16.keys() == ref.keys()
    for k, want in ref.items():
        assert fp32[k].dtype == bf16[k].dtype == torch.float32
        assert torch.equal(fp32[k], want), k
        assert torch.equal(bf16[k], want.bfloat16().float()), k  # exactly the bf16 rounding of the weight
        torch.testing.assert_close(bf16[k], want, rtol=2**-8, atol=0)

    ckpt_meta = json.loads((ckpts / "step_6" / "megavac.json").read_text())
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        exp = load_export(exports[name])  # torch.load(weights_only=True)
        assert (exp["format"], exp["format_version"]) == (FORMAT, FORMAT_VERSION)
        assert exp["dtype"] == str(dtype)[6:] and all(v.dtype == dtype for v in exp["state_dict"].values())
        assert exp["model"] == ckpt_meta["model"]
        assert exp["spm_model"] == (small_synthetic / "spm.model").read_bytes()
        assert [t["name"] for t in exp["tasks"]] == ckpt_meta["langs"]
        assert exp["tasks"][0] == {k: task_of(small_synthetic, ckpt_meta["langs"][0])[k]
                                   for k in ("name", "pair", "src", "tgt", "tag", "tag_id")}
        assert exp["data_fingerprint"] == data_fingerprint(small_synthetic, ckpt_meta["langs"])
        assert exp["special_ids"] == {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
        c = exp["provenance"]["checkpoints"]
        assert [(x["tag"], x["step"]) for x in c] == [("step_6", 6)] and exp["provenance"]["averaged"] == 1
        assert exp["provenance"]["data_dir"] == str(small_synthetic.resolve())

    model, meta = load_model(exports["fp32"])
    assert (meta["kind"], meta["step"], meta["tag"], meta["langs"]) == ("export", 6, "m", ckpt_meta["langs"])
    with pytest.raises(ValueError, match="export file, which holds one model"):
        load_model(exports["fp32"], "best")


def test_export_file_errors(tmp_path, exports):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="is not a megavac export file"):
        load_model(junk)
    torch.save({"format": "something else"}, junk)
    with pytest.raises(ValueError, match="no format 'megavac-model'"):
        load_model(junk)
    exp = load_export(exports["fp32"])
    save_export({**exp, "format_version": 99}, junk)
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_model(junk)
    save_export({**exp, "spm_model": exp["spm_model"][:-1] + b"x"}, junk)
    with pytest.raises(ValueError, match="SentencePiece model does not match its data fingerprint"):
        load_translator(junk)


def test_export_and_average_evaluate_like_the_checkpoint(ckpts, exports, tmp_path):
    langs = ["--langs", "en-qaa,en-qcb"]
    r = {}
    for name, args in {"ckpt": ["--checkpoint", ckpts, "--tag", "step_6"], "export": ["--model", exports["fp32"]],
                       "avg_export": ["--checkpoint", exports["avg"]],
                       "avg": ["--checkpoint", ckpts, "--average-last", "2"]}.items():
        evaluate_cli(tmp_path / name / "r.json", *args, *langs)
        r[name] = json.loads((tmp_path / name / "r.json").read_text())
    assert r["export"]["kind"] == "export" and r["ckpt"]["kind"] == "checkpoint"
    assert r["export"]["step"] == r["ckpt"]["step"] == 6
    assert [c["tag"] for c in r["avg"]["averaged"]] == [c["tag"] for c in r["avg_export"]["averaged"]] == [
        "step_4", "step_6"]
    for a, b in (("ckpt", "export"), ("avg", "avg_export")):
        assert list(r[a]["langs"]) == list(r[b]["langs"]) == ["en-qaa", "en-qcb"]
        for lang in r[a]["langs"]:
            x, y = r[a]["langs"][lang], r[b]["langs"][lang]
            assert (x["bleu"], x["chrf"], x["n"]) == (y["bleu"], y["chrf"], y["n"]), (a, b, lang)
            hyp = f"hyp.{lang}.test.txt"
            assert (tmp_path / a / hyp).read_text() == (tmp_path / b / hyp).read_text()


# ---------------------------------------------------------------- translate


def test_translate_stdin_gives_evaluations_hypotheses(ckpts, exports, small_synthetic, tmp_path):
    evaluate_cli(tmp_path / "r.json", "--checkpoint", exports["fp32"], "--langs", "en-qab")
    hyps = (tmp_path / "hyp.en-qab.test.txt").read_text(encoding="utf-8").split("\n")[:-1]
    src = (small_synthetic / "raw" / "qab.test.en").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(src) == len(hyps) == 30

    # Blank lines (here at the start, inside and at the end) give empty lines and leave the rest alone.
    lines = ["", *src[:10], "   ", *src[10:], ""]
    want = ["", *hyps[:10], "", *hyps[10:], ""]
    p = translate_cli("--model", exports["fp32"], "--to", "qab", *QUICK, stdin="\n".join(lines) + "\n")
    assert p.stdout.decode("utf-8").split("\n")[:-1] == want
    assert b"Traceback" not in p.stderr

    # A checkpoint (with its data dir) translates the same; --from picks the same language; files in and out.
    (tmp_path / "in.txt").write_text("\n".join(src), encoding="utf-8")  # no final newline: still a line
    translate_cli("--model", ckpts, "--tag", "step_6", "--to", "qab", "--from", "en", *QUICK, "--batch-size", "7",
                  "--input", tmp_path / "in.txt", "--output", tmp_path / "out" / "hyp.txt")
    assert (tmp_path / "out" / "hyp.txt").read_text(encoding="utf-8").split("\n")[:-1] == hyps


def test_translator_in_process(exports, small_synthetic):
    from megavac.evaluation.generate import SearchConfig

    tr = load_translator(exports["fp32"], search=SearchConfig(beam=2, max_len_a=0.5, max_len_b=2))
    assert tr.search.beam == 2 and tr.search.eos_id == 3
    task = tr.task("qba")
    assert task["name"] == "en-qba" and task["tag_id"] == task_of(small_synthetic, "en-qba")["tag_id"]
    src = (small_synthetic / "raw" / "qba.test.en").read_text(encoding="utf-8").split("\n")[:4]
    seen = []
    out = tr(["", *src], task, max_tokens=2000, progress=seen.append)
    assert len(out) == 5 and out[0] == "" and sum(seen) == 5
    buf = io.BytesIO()
    text = "\n".join(["", *src]) + "\n"
    assert translate_stream(tr, task, io.BytesIO(text.encode()), buf, "stdin", buffer=2) == 5
    # Read and decoded 2 lines at a time, in order.
    assert buf.getvalue().decode("utf-8").split("\n")[:-1] == tr(["", src[0]], task) + tr(src[1:3], task) + \
        tr(src[3:], task)
    with pytest.raises(ValueError, match=r"stdin: line 2: invalid UTF-8 at byte 1"):
        list(read_lines(io.BytesIO(b"ok\nx\xff\n"), "stdin", 10))
    raw = "a\r\nb\x85c\u2028e\n\nd".encode("utf-8")  # split on "\n" only, as evaluation reads raw text
    assert list(read_lines(io.BytesIO(raw), "f", 2)) == [["a\r", "b\x85c\u2028e"], ["", "d"]]


def test_pick_task_names_targets_and_ambiguity():
    tasks = [{"name": "en-de", "src": "en", "tgt": "de", "tag_id": 5},
             {"name": "de-en", "src": "de", "tgt": "en", "tag_id": 7},
             {"name": "fr-en", "src": "fr", "tgt": "en", "tag_id": 7}]
    assert pick_task(tasks, "de")["name"] == "en-de"
    assert pick_task(tasks, "en")["tag_id"] == 7  # two sources, one tag: no ambiguity
    assert pick_task(tasks, "en", "fr")["name"] == "fr-en"
    with pytest.raises(ValueError, match=r"does not translate into 'xx'; available targets \(--to\): de, en"):
        pick_task(tasks, "xx")
    with pytest.raises(ValueError, match=r"does not translate 'it' into 'en'; sources \(--from\) for 'en': de, fr"):
        pick_task(tasks, "en", "it")
    tasks[2] = {**tasks[2], "tag_id": 8}
    with pytest.raises(ValueError, match=r"--to 'en' is ambiguous: de-en, fr-en .* pass --from \(de, fr\)"):
        pick_task(tasks, "en")


def test_translate_errors_are_one_clear_line(exports, ckpts, tmp_path):
    p = translate_cli("--model", exports["fp32"], "--to", "zz", stdin="hello\n", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and p.stdout == b""
    assert err.strip().splitlines()[-1] == ("translate.py: error: the model does not translate into 'zz'; "
                                            "available targets (--to): qaa, qab, qba, qbb, qca, qcb")
    assert "Traceback" not in err
    p = translate_cli("--model", exports["fp32"], "--to", "qaa", "--from", "xx", check=False)
    assert p.returncode == 1 and "sources (--from) for 'qaa': en" in p.stderr.decode()
    p = subprocess.run([sys.executable, "launch/translate.py", "--model", str(exports["fp32"]), "--to", "qaa"],
                       cwd=REPO, env=launch_env(), input=b"fine\nbad \xff\n", capture_output=True, timeout=300)
    assert p.returncode == 1 and "translate.py: error: stdin: line 2: invalid UTF-8" in p.stderr.decode()
    p = translate_cli("--model", tmp_path / "nope.pt", "--to", "qaa", check=False)
    assert p.returncode == 1 and "nope.pt' does not exist" in p.stderr.decode()
    p = translate_cli("--model", exports["fp32"], "--to", "qaa", "--input", tmp_path / "missing.txt", check=False)
    assert p.returncode == 1 and "missing.txt does not exist" in p.stderr.decode()


# ---------------------------------------------------------------- data fingerprint


def test_evaluation_refuses_data_prepared_with_another_sentencepiece_model(ckpts, exports, reprepared, tmp_path):
    tag_dir = str((ckpts / "step_6").resolve())
    for args, what in (([ckpts, "--tag", "step_6"], tag_dir), ([exports["fp32"]], str(exports["fp32"].resolve())),
                       ([ckpts, "--average-last", "2"], str(ckpts.resolve()))):
        p = evaluate_cli(tmp_path / "r.json", "--checkpoint", *args, "--data-dir", reprepared, "--langs", "en-qaa",
                         check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 1 and last.startswith(f"evaluate.py: error: data dir {reprepared}: its SentencePiece "
                                                     "model"), p.stderr[-2000:]
        assert what in last and "Traceback" not in p.stderr
        assert not (tmp_path / "r.json").exists() and not list(tmp_path.glob("hyp.*"))  # nothing decoded

    # The same refusal when an export or a checkpoint translator is built from that data dir.
    model, meta = load_model_from_checkpoint(ckpts, "step_6")
    with pytest.raises(ValueError, match=f"its SentencePiece model .* not the one {tag_dir}"):
        build_export(model.state_dict(), meta, reprepared)
    with pytest.raises(ValueError, match="its SentencePiece model"):
        load_translator(ckpts, "step_6", data_dir=reprepared)
    p = run([sys.executable, "launch/export.py", "--checkpoint", ckpts, "--out", tmp_path / "x.pt", "--data-dir",
             reprepared], check=False)
    assert p.returncode == 1 and "export.py: error: data dir" in p.stderr and not (tmp_path / "x.pt").exists()

    # A language the model was not trained on is refused by name too, before decoding.
    from megavac.evaluation.evaluate import EvalOptions, evaluate

    fp = {**meta["data_fingerprint"], "langs": ["en-qaa"], "tag_ids": {"en-qaa": 5}}
    with pytest.raises(ValueError, match=rf"{tag_dir} was not trained on \['en-qcb'\]"):
        evaluate(model, meta["data_dir"], tmp_path / "e", "en-qcb", EvalOptions(), fingerprint=fp, what=tag_dir)
    assert not (tmp_path / "e").exists()
