#!/usr/bin/env bash
# One-GPU check of megavac on an NVIDIA machine (written for one H200), ≤ 8 minutes wall time in total.
#
#     bash bench/gpu_check.sh                  # from anywhere; it cd's to the repository root
#     OUT=/tmp/gc STEPS=60 MAX_TOKENS=32768 PEAK_FLOPS=989e12 bash bench/gpu_check.sh
#
# Each section prints a header; a failing one does not stop the later ones. Every step runs under
# `timeout`, and a global deadline (TOTAL_BUDGET) shortens or skips late steps. Installs nothing.
#   0. environment: nvidia-smi, python/torch/CUDA/DeepSpeed versions, imports (repo root on PYTHONPATH).
#   1. the synthetic corpus (data_pipeline.default_corpus), prepared into $SYNTHETIC_DIR/prepared unless cached.
#   2. bf16 and fp16 training through launch/train.py (ds_configs/zero2_{bf16,fp16}.json), one GPU: tokens/s
#      (metrics.jsonl, first window skipped), MFU = 6 x params x tokens/s / PEAK_FLOPS, peak memory from
#      nvidia-smi every 500 ms and torch.cuda.max_memory_* read by a sitecustomize hook at process exit.
#   3. per-language step cost, one GPU: deepspeed --num_gpus 1 bench/pergrad.py --model $MODEL --tokens 8192
#      --methods mono-gram gradvac --collectors 1bw --reps 3, with --langs 8 32 --precision bf16 and then,
#      if time is left, --langs 8 --precision fp16; the summary gets each method's "x mono" per K.
#   Summary table at the end, also in $OUT/summary.txt; logs and parsed results under $OUT.
#
# Knobs (defaults): OUT (gpu_check_out), PYTHON (python, else python3), MODEL (base), STEPS (100),
# LOG_INTERVAL (10), MAX_TOKENS (16384 padded tokens per micro-batch), PEAK_FLOPS (989e12: H200 dense
# bf16/fp16), TOTAL_BUDGET (450 s), PREP_TIMEOUT (150), TRAIN_TIMEOUT (150), PERGRAD_TIMEOUT (180),
# SYNTHETIC_DIR (runs/data/synthetic), RUN_ROOT (runs/gpu_check: save dirs, checkpoints deleted after each
# run), KEEP_CHECKPOINTS (0), MEM_HOOK (1), GPU_CHECK_FORCE (0; 1: GPU steps even if torch sees no CUDA
# device), GPU_CHECK_PIP (0; 1: pip install -r requirements.txt if `import megavac` fails; needs PyPI).
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${OUT:=gpu_check_out}" "${MODEL:=base}" "${STEPS:=100}" "${LOG_INTERVAL:=10}" "${MAX_TOKENS:=16384}"
: "${PEAK_FLOPS:=989e12}" "${TOTAL_BUDGET:=450}" "${PREP_TIMEOUT:=150}" "${TRAIN_TIMEOUT:=150}"
: "${PERGRAD_TIMEOUT:=180}" "${SYNTHETIC_DIR:=runs/data/synthetic}" "${RUN_ROOT:=runs/gpu_check}"
: "${KEEP_CHECKPOINTS:=0}" "${MEM_HOOK:=1}" "${GPU_CHECK_FORCE:=0}" "${GPU_CHECK_PIP:=0}"
PERGRAD_ARGS=(--model "$MODEL" --tokens 8192 --methods mono-gram gradvac --collectors 1bw --reps 3)
RESERVE=20   # seconds kept for the summary
KILL_GRACE=10

SUMMARY=()   # "section<TAB>status<TAB>details"
HAVE_CUDA=0 HOOK_DIR="" SECS=0 RUN_PID="" MEM_PID=""

# ------------------------------------------------------------------------------------------ helpers

header() { printf '\n==================== %s ====================  [t=%ds]\n' "$*" "$SECONDS"; }
add_summary() { SUMMARY+=("$1"$'\t'"$2"$'\t'"$3"); }

add_result() {  # add_result LABEL EXIT_STATUS DETAIL
  local st="FAIL(rc=$2)"
  case "$2" in 0) st=OK ;; 124|137) st=TIMEOUT ;; esac
  add_summary "$1" "$st" "$3"
}

# step_secs LABEL CAP: SECS = min(CAP, time left before the deadline); under 30 s a SKIPPED row, and fails.
step_secs() {
  local left=$(( TOTAL_BUDGET - RESERVE - KILL_GRACE - SECONDS ))
  SECS=$(( $2 < left ? $2 : left ))
  (( SECS >= 30 )) || { add_summary "$1" "SKIPPED" "out of time"; return 1; }
}

need_gpu() {  # need_gpu LABEL: fails, with a SKIPPED row, when torch sees no CUDA device (and no FORCE)
  (( HAVE_CUDA )) || [[ "$GPU_CHECK_FORCE" == 1 ]] && return 0
  add_summary "$1" "SKIPPED" "no CUDA device visible to torch (GPU_CHECK_FORCE=1 to run anyway)"
  return 1
}

# run_capped SECONDS LOGFILE CMD...: the command under timeout (TERM, then KILL after KILL_GRACE), output
# to LOGFILE; returns its exit status (124 or 137: timed out).
run_capped() {
  local secs=$1 log=$2 rc; shift 2
  # In the background (with the caller's stdin: heredocs) so that an interrupt of this script can stop it:
  # timeout runs its command in a process group of its own, which a terminal's Ctrl-C does not reach.
  timeout -k "$KILL_GRACE" "$secs" "$@" >"$log" 2>&1 <&0 &
  RUN_PID=$!
  wait "$RUN_PID"; rc=$?; RUN_PID=""
  return $rc
}

# The memory sampler: memory.used (MiB) and utilization.gpu (%) of every visible GPU every 500 ms.
start_sampler() {
  MEM_PID=""
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 >"$1" 2>/dev/null &
  MEM_PID=$!
}
stop_sampler() {
  [[ -n "$MEM_PID" ]] && { kill "$MEM_PID" 2>/dev/null; wait "$MEM_PID" 2>/dev/null; }
  MEM_PID=""
}
gpu_mem_now() {  # MiB used now (max over GPUs), empty without nvidia-smi
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  timeout 15 nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | sort -n | tail -1 | tr -d ' '
}

on_signal() {
  trap - INT TERM
  echo; echo "interrupted: stopping the running step"
  if [[ -n "$RUN_PID" ]]; then kill -TERM "$RUN_PID" 2>/dev/null; wait "$RUN_PID" 2>/dev/null; fi
  stop_sampler
  add_summary "(interrupted)" "ABORTED" "at t=${SECONDS}s"
  print_summary
  exit 130
}
trap stop_sampler EXIT
trap on_signal INT TERM

# ------------------------------------------------------------------------------- 0. environment

section_env() {
  header "0. environment"
  local f="$OUT/00_env.txt"
  : >"$f"
  if command -v nvidia-smi >/dev/null 2>&1; then
    { timeout 20 nvidia-smi; echo;
      timeout 20 nvidia-smi --query-gpu=index,name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv;
    } 2>&1 | tee -a "$f"
  else
    echo "nvidia-smi: not found" | tee -a "$f"
  fi
  echo "python: $PY ($(command -v "$PY"))" | tee -a "$f"
  local info rc
  info=$(timeout 90 "$PY" - <<'EOF' 2>&1
import importlib, sys
print(f"python {sys.version.split()[0]}")
ok = {}
try:
    import torch
    ok["torch"] = True
    print(f"torch {torch.__version__} | CUDA build {torch.version.cuda} | cuda available {torch.cuda.is_available()}"
          f" | devices {torch.cuda.device_count()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs | bf16 supported {torch.cuda.is_bf16_supported()} | "
              f"cudnn {torch.backends.cudnn.version()} | nccl {'.'.join(map(str, torch.cuda.nccl.version()))}")
        ok["cuda"] = True
except Exception as e:
    print(f"IMPORT FAILED: torch: {type(e).__name__}: {e}")
try:
    import deepspeed
    ok["deepspeed"] = True
    from deepspeed.accelerator import get_accelerator
    print(f"deepspeed {deepspeed.__version__} | accelerator {get_accelerator().device_name()}")
except Exception as e:
    print(f"IMPORT FAILED: deepspeed: {type(e).__name__}: {e}")
for mod in ("megavac", "data_pipeline", "sentencepiece", "numpy", "sacrebleu", "tensorboard", "rich", "psutil"):
    try:
        m = importlib.import_module(mod)
        ok[mod] = True
        print(f"import {mod}: ok {getattr(m, '__version__', '')} ({getattr(m, '__file__', '')})")
    except Exception as e:
        print(f"IMPORT FAILED: {mod}: {type(e).__name__}: {e}")
print("FLAGS " + " ".join(sorted(ok)))
EOF
)
  rc=$?
  echo "$info" | grep -v '^FLAGS ' | tee -a "$f"
  local flags gpu torchv dsv missing="" x st=OK
  flags=" $(echo "$info" | grep '^FLAGS ' | tail -1) "
  [[ "$flags" == *" cuda "* ]] && HAVE_CUDA=1
  if [[ "$flags" != *" megavac "* ]]; then
    if [[ "$GPU_CHECK_PIP" == 1 ]]; then
      echo "import megavac failed: GPU_CHECK_PIP=1, running pip install -q -r requirements.txt (needs PyPI)" | tee -a "$f"
      timeout 240 "$PY" -m pip install -q -r requirements.txt 2>&1 | tail -20 | tee -a "$f"
      "$PY" -c "import megavac, data_pipeline" >>"$f" 2>&1 && flags+="megavac data_pipeline "
    else
      echo "import megavac FAILED even with the repository root on PYTHONPATH: its dependencies are missing" \
           "(see above); this script installs nothing (no internet; GPU_CHECK_PIP=1 to try pip)" | tee -a "$f"
    fi
  fi
  gpu=$(echo "$info" | sed -n 's/^device 0: \([^,]*\),.*/\1/p' | head -1)
  torchv=$(echo "$info" | sed -n 's/^torch \([^ ]*\) | CUDA build \([^ ]*\).*/\1 (CUDA \2)/p' | head -1)
  dsv=$(echo "$info" | sed -n 's/^deepspeed \([^ ]*\).*/\1/p' | head -1)
  for x in torch deepspeed megavac cuda; do [[ "$flags" == *" $x "* ]] || missing+=" ${x/cuda/cuda-device}"; done
  [[ -n "$missing" || $rc -ne 0 ]] && st=FAIL
  add_summary "environment" "$st" "gpu ${gpu:-?} | torch ${torchv:-?} | deepspeed ${dsv:-?}${missing:+ | missing:$missing}"
}

# ------------------------------------------------------------------------- 1. synthetic corpus

section_data() {
  header "1. synthetic corpus (${SYNTHETIC_DIR})"
  local log="$OUT/01_prepare.log" t0=$SECONDS rc detail
  step_secs "synthetic corpus" "$PREP_TIMEOUT" || return
  echo "generating/preparing if not cached (timeout ${SECS}s), log $log"
  # A file, not `python -`: preparation uses spawned worker pools, which re-import the main module by path.
  mkdir -p "$OUT/_py"
  cat >"$OUT/_py/prepare_synthetic.py" <<'EOF'
"""The project's default synthetic corpus, generated with all cores, prepared as the trainer would."""
import json, os, sys, time
from pathlib import Path

if __name__ == "__main__":
    from data_pipeline.default_corpus import MAX_SIZE, MIN_SIZE, SEED, ensure_prepared_synthetic
    from data_pipeline.synthetic import generate_corpus

    root, t = Path(sys.argv[1]), time.time()
    if (root / "prepared" / "meta.json").is_file():
        print(f"cached: {root / 'prepared'}")
    else:
        if not (root / "corpus" / "langs.tsv").is_file():
            # The corpus ensure_prepared_synthetic generates (deterministic per language), on all cores.
            generate_corpus(root / "corpus", seed=SEED, min_size=MIN_SIZE, max_size=MAX_SIZE,
                            workers=max(1, min(16, os.cpu_count() or 1)))
            print(f"generated corpus in {time.time() - t:.1f} s", flush=True)
        ensure_prepared_synthetic(root, quiet=True)
        print(f"prepared {root / 'prepared'} in {time.time() - t:.1f} s")
    meta = json.loads((root / "prepared" / "meta.json").read_text())
    print(f"languages {len(meta['tasks'])}, vocab {meta['vocab_size']}")
EOF
  run_capped "$SECS" "$log" "$PY" "$OUT/_py/prepare_synthetic.py" "$SYNTHETIC_DIR"
  rc=$?
  tail -5 "$log"
  detail="$(grep -E '^(cached|prepared|languages)' "$log" | tr '\n' ' ')"
  add_result "synthetic corpus" "$rc" "${detail:-see $log} ($(( SECONDS - t0 )) s)"
}

# ----------------------------------------------------------------------------- 2. training runs

make_mem_hook() {
  # A sitecustomize on PYTHONPATH (only for the measured commands): at exit of a process that initialised
  # CUDA, append torch.cuda.max_memory_allocated/reserved to $GPU_CHECK_MEMFILE. Skipped when the
  # environment already has a sitecustomize (ours would shadow it).
  [[ "$MEM_HOOK" == 1 ]] || return 0
  if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("sitecustomize") is not None)' 2>/dev/null; then
    echo "(memory hook disabled: this Python already has a sitecustomize module)"
    return 0
  fi
  HOOK_DIR="$OUT/_pyhook"
  mkdir -p "$HOOK_DIR"
  cat >"$HOOK_DIR/sitecustomize.py" <<'EOF'
# Written by bench/gpu_check.sh: peak CUDA memory of each process at exit (atexit and os._exit).
import atexit, json, os, sys

_done = []


def _gpu_check_dump():
    torch, path = sys.modules.get("torch"), os.environ.get("GPU_CHECK_MEMFILE")
    try:
        if _done or not path or torch is None or not torch.cuda.is_initialized():
            return
        _done.append(1)
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "rank": os.environ.get("RANK"), "argv": sys.argv[:1],
                                "max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                                "max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}) + "\n")
    except Exception:
        pass


atexit.register(_gpu_check_dump)
os._exit = lambda code, _orig=os._exit: (_gpu_check_dump(), _orig(code))
EOF
}

# launch LOG MEMFILE CMD...: prints CMD and runs it capped at SECS, with the memory hook on PYTHONPATH.
launch() {
  local log=$1 memfile=$2; shift 2
  rm -f "$memfile"
  echo "+ $*"; echo "  (timeout ${SECS}s, log $log)"
  if [[ -n "$HOOK_DIR" ]]; then
    GPU_CHECK_MEMFILE="$memfile" PYTHONPATH="$HOOK_DIR:$PYTHONPATH" run_capped "$SECS" "$log" "$@"
  else
    run_capped "$SECS" "$log" "$@"
  fi
}

analyse_train() {  # analyse_train TAG SAVE_DIR LOG NVSMI_CSV MEMFILE BASELINE_MIB -> one summary line
  "$PY" - "$@" "$PEAK_FLOPS" "$MODEL" "$SYNTHETIC_DIR" "$OUT" <<'EOF'
import json, os, re, statistics, sys

tag, save, log, nvsmi, memfile, baseline, peak, model, syn, out = sys.argv[1:11]
res = {"tag": tag, "peak_flops": float(peak)}


def lines(path):
    return open(path, errors="replace").read().splitlines() if os.path.isfile(path) else []


def parse(conv, path):  # conv(line) for each line of the file, lines it cannot parse skipped
    vals = []
    for line in lines(path):
        try:
            vals.append(conv(line))
        except ValueError:
            pass
    return vals


recs = parse(json.loads, os.path.join(save, "metrics.jsonl"))
text = "\n".join(lines(log))
train = [r for r in recs if r.get("kind") == "train" and r.get("tokens_per_s")]
res.update(windows=len(train), last_step=train[-1]["step"] if train else 0)
m = re.search(r"model \S+: ([\d,]+) parameters", text)
params = int(m.group(1).replace(",", "")) if m else None
if params is None:  # the model on the meta device, as the trainer counts it
    try:
        import torch
        from megavac.model import PRESETS, ModelConfig, Transformer
        meta = json.load(open(os.path.join(syn, "prepared", "meta.json")))
        with torch.device("meta"):
            params = Transformer(ModelConfig(vocab_size=meta["vocab_size"], pad_id=meta["pad_id"],
                                             **PRESETS[model])).num_parameters()
    except Exception:
        params = None
res["params"] = params
steady = train[1:] if len(train) > 1 else train  # the first window holds warm-up (as bench/train_throughput.py)
if steady:
    tokens, secs = sum(r["tokens"] for r in steady), sum(r["tokens"] / r["tokens_per_s"] for r in steady)
    steps = steady[-1]["step"] - (train[0]["step"] if len(train) > 1 else 0)
    res.update(tok_s=tokens / secs, tok_s_median_window=statistics.median(r["tokens_per_s"] for r in steady),
               steady_steps=steps, ms_per_step=1e3 * secs / max(steps, 1), tokens_per_step=tokens / max(steps, 1),
               loss_first=train[0]["loss"], loss_last=train[-1]["loss"])
    if params:
        res["mfu"] = 6 * params * res["tok_s"] / res["peak_flops"]
valid = [r for r in recs if r.get("kind") == "valid"]
if valid:
    res["valid_avg_nll"] = valid[-1].get("avg_nll")
res["fp16_overflow_lines"] = len(re.findall(r"OVERFLOW!|[Ss]kipping step", text))  # fp16 loss-scale skips
res["errors"] = [l for l in text.splitlines() if re.search(r"Error|error:|Traceback|CUDA out of memory", l)][-5:]

samples = [s for s in parse(lambda l: [float(p) for p in l.split(",")[:2]], nvsmi) if len(s) == 2]  # MiB, %
if samples:
    busy = [u for _, u in samples if u > 0]
    res.update(nvsmi_peak_mib=max(m for m, _ in samples), nvsmi_samples=len(samples),
               gpu_util_mean_busy=statistics.mean(busy) if busy else 0.0)
try:
    if float(baseline) == float(baseline):  # not nan (no nvidia-smi)
        res["nvsmi_baseline_mib"] = float(baseline)
except ValueError:
    pass
hooks = parse(json.loads, memfile)
if hooks:
    res["torch_max_allocated_mib"] = max(h["max_allocated_mib"] for h in hooks)
    res["torch_max_reserved_mib"] = max(h["max_reserved_mib"] for h in hooks)
json.dump(res, open(os.path.join(out, f"02_train_{tag}_result.json"), "w"), indent=2)

parts = [f"steps {res['last_step']}"] + ([f"{params / 1e6:.2f}M params"] if params else [])
if "tok_s" in res:
    parts += [f"{res['tok_s']:,.0f} tok/s ({res['ms_per_step']:.1f} ms/step, {res['tokens_per_step']:,.0f} tgt tok/step)",
              f"MFU {100 * res['mfu']:.1f}%" if "mfu" in res else "MFU ?",
              f"loss {res['loss_first']:.2f}->{res['loss_last']:.2f}"]
else:
    parts.append("no train records in metrics.jsonl")
if "nvsmi_peak_mib" in res:
    base = res.get("nvsmi_baseline_mib")
    parts += [f"nvidia-smi peak {res['nvsmi_peak_mib']:,.0f} MiB" + (f" (idle {base:,.0f})" if base is not None else ""),
              f"util {res['gpu_util_mean_busy']:.0f}%"]
if hooks:
    parts.append(f"torch max alloc {res['torch_max_allocated_mib']:,.0f} / reserved {res['torch_max_reserved_mib']:,.0f} MiB")
if res["fp16_overflow_lines"]:
    parts.append(f"{res['fp16_overflow_lines']} overflow lines")
print(" | ".join(parts))
for e in res["errors"]:
    print("  ! " + e[:300], file=sys.stderr)
EOF
}

train_run() {  # train_run TAG DS_CONFIG
  local tag=$1 cfg=$2 label="train $1"
  header "2. training: $MODEL, $tag ($cfg), $STEPS steps, --max-tokens $MAX_TOKENS"
  need_gpu "$label" || return
  if [[ ! -f "$SYNTHETIC_DIR/prepared/meta.json" ]]; then  # the trainer would prepare it, single-process
    add_summary "$label" "SKIPPED" "synthetic corpus not prepared (section 1)"; return
  fi
  step_secs "$label" "$TRAIN_TIMEOUT" || return
  local save="$RUN_ROOT/$tag" log="$OUT/02_train_$tag.log" csv="$OUT/02_train_${tag}_nvsmi.csv"
  local memfile="$OUT/02_train_${tag}_torchmem.jsonl" t0=$SECONDS rc base detail f
  rm -rf "$save"
  base=$(gpu_mem_now)
  start_sampler "$csv"
  launch "$log" "$memfile" "${DS_LAUNCH[@]}" --num_gpus 1 --master_port "$(( 29600 + RANDOM % 300 ))" launch/train.py \
    --ds_config "$cfg" --synthetic-dir "$SYNTHETIC_DIR" --model "$MODEL" --max-tokens "$MAX_TOKENS" \
    --max-steps "$STEPS" --log-interval "$LOG_INTERVAL" --lang-log-interval 1000000 --valid-interval 1000000 \
    --save-interval 1000000 --save-dir "$save"
  rc=$?
  stop_sampler
  echo "exit status $rc after $(( SECONDS - t0 )) s; progress lines and log tail:"
  grep -E '^(model |step |valid step)' "$log" | tail -14
  tail -6 "$log" | sed 's/^/  | /'
  for f in metrics.jsonl config.json; do [[ -f "$save/$f" ]] && cp "$save/$f" "$OUT/02_train_${tag}_$f"; done
  detail=$(analyse_train "$tag" "$save" "$log" "$csv" "$memfile" "${base:-nan}")
  echo ">> $tag: $detail"
  [[ "$KEEP_CHECKPOINTS" == 1 ]] || rm -rf "$save/checkpoints"
  add_result "$label" "$rc" "$detail ($(( SECONDS - t0 )) s wall)"
}

# ------------------------------------------------------------------------ 3. per-language step cost

analyse_pergrad() {  # analyse_pergrad LOG MEMFILE -> one summary line: each method's "x mono" per K
  "$PY" - "$1" "$2" <<'EOF'
import json, os, re, sys
log, memfile = sys.argv[1:3]
text = open(log, errors="replace").read() if os.path.isfile(log) else ""
out = []
m = re.search(r"^model (\S+) \(([\d.]+)M parameters", text, re.M)
head = f"{m.group(1)} {m.group(2)}M" if m else ""
for block in re.split(r"\n(?=K = \d+ languages)", text):
    k = re.match(r"K = (\d+) languages per batch[^\n]*?: monolithic (\d+) ms/step", block)
    if not k:
        continue
    rows = re.findall(r"^  (\S+(?: \[\w+\])?)\s+(\d+\.\d+)(?:\s|$)", block, re.M)
    ratios = ", ".join(f"{name} x{float(r):.2f}" for name, r in rows if name != "monolithic")
    out.append(f"K={k.group(1)}: mono {k.group(2)} ms, {ratios}")
hooks = [json.loads(l) for l in open(memfile) if l.strip()] if os.path.isfile(memfile) else []
tail = (f" | torch max alloc {max(h['max_allocated_mib'] for h in hooks):,.0f} / reserved "
        f"{max(h['max_reserved_mib'] for h in hooks):,.0f} MiB") if hooks else ""
print((head + " | " if head else "") + ("; ".join(out) if out else "no K results in the log") + tail)
EOF
}

pergrad_run() {  # pergrad_run PRECISION ARGS...: bench/pergrad.py on one GPU, PERGRAD_ARGS + ARGS
  local prec=$1 label="pergrad $1" log="$OUT/03_pergrad_$1.log" memfile="$OUT/03_pergrad_$1_torchmem.jsonl"
  local t0=$SECONDS rc detail; shift
  header "3. per-language step cost, $prec: bench/pergrad.py ${PERGRAD_ARGS[*]} $* --precision $prec"
  need_gpu "$label" || return
  step_secs "$label" "$PERGRAD_TIMEOUT" || return
  launch "$log" "$memfile" "${DS_LAUNCH[@]}" --num_gpus 1 --master_port "$(( 29950 + RANDOM % 40 ))" \
    bench/pergrad.py "${PERGRAD_ARGS[@]}" "$@" --precision "$prec"
  rc=$?
  echo "exit status $rc after $(( SECONDS - t0 )) s:"
  grep -vE '^\[20[0-9]{2}-|^\s*$|Warning|warn' "$log" | tail -25
  detail=$(analyse_pergrad "$log" "$memfile")
  echo ">> $detail"
  add_result "$label" "$rc" "$detail ($(( SECONDS - t0 )) s)"
}

# ----------------------------------------------------------------------------------- summary

print_summary() {
  header "summary"
  local f="$OUT/summary.txt" line sec st det
  {
    echo "megavac GPU check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "model $MODEL, $STEPS steps, --max-tokens $MAX_TOKENS, PEAK_FLOPS $PEAK_FLOPS; MFU = 6 x params x target tok/s / PEAK_FLOPS"
    echo "(target non-pad tokens; source tokens, attention and padding FLOPs not counted; first log window skipped)"
    printf '%-24s %-12s %s\n' "section" "status" "result" "-------" "------" "------"
    for line in "${SUMMARY[@]+"${SUMMARY[@]}"}"; do
      IFS=$'\t' read -r sec st det <<<"$line"
      printf '%-24s %-12s %s\n' "$sec" "$st" "$det"
    done
    echo "total wall time ${SECONDS} s (budget ${TOTAL_BUDGET} s); logs in $OUT"
  } | tee "$f"
}

# -------------------------------------------------------------------------------------- main

main() {
  cd "$REPO" || exit 1
  mkdir -p "$OUT" || exit 1
  OUT="$(cd "$OUT" && pwd)"
  SECONDS=0
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif command -v python >/dev/null 2>&1; then PY=python
  else PY=python3; fi
  # megavac and data_pipeline importable without installing (the device copy may lack `pip install -e .`);
  # the deepspeed launcher passes the environment to the ranks.
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  if command -v deepspeed >/dev/null 2>&1; then DS_LAUNCH=(deepspeed)
  else DS_LAUNCH=("$PY" -m deepspeed.launcher.runner); fi
  echo "megavac GPU check: repo $REPO, output $OUT, budget ${TOTAL_BUDGET}s, launcher: ${DS_LAUNCH[*]}"

  section_env
  section_data
  make_mem_hook
  train_run bf16 ds_configs/zero2_bf16.json
  train_run fp16 ds_configs/zero2_fp16.json
  pergrad_run bf16 --langs 8 32
  pergrad_run fp16 --langs 8
  print_summary
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
