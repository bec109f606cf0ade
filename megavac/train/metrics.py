"""Progress lines, JSONL metrics and TensorBoard, written by rank 0 only."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Metrics:
    def __init__(self, save_dir: str, rank: int, max_steps: int, tensorboard: bool = True):
        self.rank, self.max_steps = rank, max_steps
        self.t_last, self.step_last = time.time(), None
        self.jsonl = self.tb = None
        if rank != 0:
            return
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(save_dir) / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(save_dir) / "tensorboard"))

    def start(self, step: int):
        self.t_last, self.step_last = time.time(), step

    def write(self, step: int, kind: str, values: dict):
        if self.rank != 0:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, "time": round(time.time(), 3), **values}) + "\n")
        if self.tb is not None:
            for key, v in values.items():
                if isinstance(v, dict):
                    for sub, x in v.items():
                        self.tb.add_scalar(f"{kind}/{key}/{sub}", x, step)
                elif isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", v, step)

    def progress(self, step: int, loss: float, lr: float, tokens: int, extra: str = ""):
        """One progress line: step, loss, lr, global target tokens/s, ETA."""
        now = time.time()
        steps = step - self.step_last
        dt = max(now - self.t_last, 1e-9)
        tok_s = tokens / dt
        eta = (self.max_steps - step) * dt / max(steps, 1)
        self.t_last, self.step_last = now, step
        self.write(step, "train", {"loss": loss, "lr": lr, "tokens_per_s": tok_s, "tokens": tokens})
        if self.rank == 0:
            print(f"step {step:>6}/{self.max_steps} | loss {loss:.4f} | lr {lr:.3e} | "
                  f"{tok_s:,.0f} tok/s | ETA {_fmt_time(eta)}{extra}", flush=True)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
