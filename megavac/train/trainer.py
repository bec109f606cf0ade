"""The trainer: builds everything in dependency order, then runs the loop.

Order: distributed → data → model → DeepSpeed engine → sampler/validation/metrics/checkpoints →
resume. Everything stateful is saved as a dict of ``state_dict()`` objects.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from megavac import distributed
from megavac.fingerprint import check_data_fingerprint, data_fingerprint
from megavac.train.checkpoints import Checkpointer
from megavac.train.divergence import DivergenceGuard
from megavac.train import reshard, resume_check
from megavac.config import (DataConfig, MethodConfig, TrainConfig, load_ds_config, merge_ds_config, model_config,
                            parse_lang_weights, precision_of, run_config_dict)
from megavac.data import MultilingualDataset, TemperatureSampler, collate, sampling_probs
from megavac.model.groups import model_param_names
from megavac.loss import LossTally
from megavac.train.metrics import Metrics
from megavac.model import Transformer
from megavac.train.plain_step import PlainStep
from megavac.train.preemption import Preemption
from megavac.train.run_lock import RunLock
from megavac.train.validation import Validator


def inverse_sqrt(warmup: int):
    """lr factor: linear warm-up to 1 over ``warmup`` updates, then sqrt(warmup / step)."""
    if warmup < 1:
        raise ValueError(f"--warmup-steps must be >= 1, got {warmup}")
    return lambda s: min((s + 1) / warmup, math.sqrt(warmup / (s + 1)))


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_data_dir(data: DataConfig, rank: int) -> str:
    """The prepared data dir; the synthetic default is generated once (by rank 0) and cached."""
    if data.data_dir:
        return data.data_dir
    from data_pipeline.default_corpus import ensure_prepared_synthetic

    prepared = Path(data.synthetic_dir) / "prepared"
    if rank == 0 and not (prepared / "meta.json").is_file():
        print(f"no --data-dir given: preparing the synthetic corpus in {data.synthetic_dir}", flush=True)
        ensure_prepared_synthetic(data.synthetic_dir)
    distributed.barrier()
    return str(prepared)


def build_method(cfg: MethodConfig, train_data: MultilingualDataset, param_names: list[str]):
    """The per-language gradient method with its (resolved) options."""
    from megavac.methods import RunInfo, method_class

    sizes = [train_data.meta["pairs"][t["pair"]]["train_raw"] for t in train_data.langs]
    run = RunInfo(sizes=sizes, param_names=param_names, granularity=cfg.granularity)
    return method_class(cfg.method).for_run(train_data.num_langs, cfg.options, run)


class Trainer:
    def __init__(self, data: DataConfig, train: TrainConfig, method: MethodConfig, ds_config_path: str):
        self.data_cfg, self.cfg, self.method_cfg = data, train, method
        self.rank, self.world, self.local_rank = distributed.init()
        self.device = distributed.device()
        self.lock = self._lock_save_dir(train.save_dir)
        try:
            self._build(data, train, method, ds_config_path)
        except BaseException:  # a refused resume, a bad config, ...: the run directory is free again
            self.lock.release()
            raise

    def _build(self, data: DataConfig, train: TrainConfig, method: MethodConfig, ds_config_path: str):
        if self.rank != 0:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        seed_everything(train.seed)

        # Data
        self.data_dir = resolve_data_dir(data, self.rank)
        self.train_data = MultilingualDataset(self.data_dir, "train", data.langs)
        self.dev_data = MultilingualDataset(self.data_dir, "dev", self.train_data.names)
        self.K = self.train_data.num_langs
        meta = self.train_data.meta

        # Model and engine. With pipeline stages each rank builds only its stage's layers
        # (megavac.model.pipeline); data parallelism then runs over world / stages ranks.
        import deepspeed

        self.ds_config = merge_ds_config(load_ds_config(ds_config_path), train, self.world)
        self.stages = self.ds_config.get("pipeline", {}).get("stages", 1)
        # The checkpoint to resume from is chosen (verified, else the newest that verifies) before the engine
        # exists: its layout decides how the engine is built.
        self.checkpointer = Checkpointer(train.save_dir, self.rank, train.keep_last, info={})
        self.resume_tag = self.checkpointer.choose_resume_tag() if train.resume else None
        self.resume_from = self._saved_meta()
        self.reshard = self.resume_from[0] is not None and \
            reshard.layout(self.resume_from[0]) != (self.world, self.stages)
        if self.reshard:  # another layout: DeepSpeed's universal checkpoint, which the engine must know at build
            reshard.check_supported(self.resume_from[0], self.world, self.stages, self.resume_from[1].parent)
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.model_cfg = model_config(train, meta["vocab_size"], meta["pad_id"], self.train_data.langs,
                                      meta.get("corpus"))  # the languages: --family-experts routes by their family
        self.runner = None
        if self.stages > 1:
            from megavac.model.pipeline import PipelineLoss, make_pipeline_module

            model = make_pipeline_module(self.model_cfg, self.stages,
                                         PipelineLoss(self.K, meta["pad_id"], train.label_smoothing))
        else:
            model = Transformer(self.model_cfg)
        _, param_names = model_param_names(model)  # the whole model's, as the parameter groups name them
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt(train.warmup_steps)))
        self.ga = self.engine.gradient_accumulation_steps()
        if self.stages > 1:
            from megavac.model.pipeline import PipelineRunner

            self.runner = PipelineRunner(self.engine)
            # Every stage of a pipeline reads the same batches: the sampler shards over data-parallel ranks.
            self.dp_rank, self.dp_world = self.engine.grid.data_parallel_id, self.engine.grid.data_parallel_size
        else:
            self.dp_rank, self.dp_world = self.rank, self.world
        # Dropout must differ across ranks but be reproducible: seed the torch RNG per rank after init.
        torch.manual_seed(train.seed * 1000 + self.rank)

        # The plain step (monolithic training, and a method's steps without a Gram), then the per-language
        # gradient method; monolithic training never touches DeepSpeed internals.
        self.plain_step = PlainStep(self.engine, self.K, meta["pad_id"], train.label_smoothing, self.runner)
        self.method = build_method(method, self.train_data, param_names)
        self.pergrad = None
        if method.method != "monolithic" or method.gram_log_interval:  # monolithic: Grams for the log only
            from megavac.pergrad import PerLanguageStep

            self.pergrad = PerLanguageStep(
                self.engine, self.method, self.K, pad_id=meta["pad_id"], label_smoothing=train.label_smoothing,
                granularity=method.granularity, seed=train.seed, lang_names=self.train_data.names,
                collector=method.collector, plain=self.plain_step, gram_log_dir=Path(train.save_dir) / "grams",
                gram_log_interval=method.gram_log_interval)

        # Components
        lengths = [self.train_data.example_len(k, np.arange(n)) for k, n in enumerate(self.train_data.sizes)]
        self.probs = sampling_probs(self.train_data.sizes, data.temperature,
                                    parse_lang_weights(data.lang_weights, self.train_data.names))
        self.sampler = TemperatureSampler(lengths, self.probs, data.max_tokens, train.seed, self.dp_rank,
                                          self.dp_world, data.pool_batches, method.langs_per_batch,
                                          lang_affine=data.lang_affine)
        self.validator = Validator(self.dev_data, train.valid_max_tokens, self.model_cfg.max_positions,
                                   self.dp_rank, self.dp_world, self.device, train.label_smoothing, self.runner)
        self.metrics = Metrics(train.save_dir, self.rank, train.max_steps)
        self.settings = resume_check.effective_settings(data, train, method, self.model_cfg.to_dict(), self.ds_config)
        self.guard = DivergenceGuard(train.max_loss or DivergenceGuard.default_max_loss(meta["vocab_size"]),
                                     train.max_skipped_steps)
        info = {"model": self.model_cfg.to_dict(), "data_dir": str(Path(self.data_dir).resolve()),
                "data_fingerprint": data_fingerprint(self.data_dir, self.train_data.names),
                "settings": self.settings, "langs": self.train_data.names, "world_size": self.world,
                "zero_stage": self.ds_config["zero_optimization"]["stage"], "precision": precision_of(self.ds_config),
                "method": method.method, "pipeline_stages": self.stages}
        self.checkpointer.info = info
        self.preemption = Preemption(self.rank, self.device)  # SIGTERM/SIGUSR1: checkpoint, exit, requeue
        self.step, self._converted = 0, None
        if train.resume:
            self._resume()
        self._announce()

    def _announce(self):
        if self.rank != 0:
            return
        Path(self.cfg.save_dir).mkdir(parents=True, exist_ok=True)
        run = run_config_dict(self.data_cfg, self.cfg, self.method_cfg, self.model_cfg, self.ds_config)
        (Path(self.cfg.save_dir) / "config.json").write_text(json.dumps(run, indent=2, default=str))
        with torch.device("meta"):
            params = Transformer(self.model_cfg).num_parameters()
        layout = f"world {self.world}" if self.stages == 1 else \
            f"world {self.world} = {self.stages} pipeline stages × {self.dp_world} data-parallel"
        print(f"model {self.cfg.model}: {params:,} parameters | {self.K} languages | {layout} | ZeRO-{self.ds_config['zero_optimization']['stage']} "
              f"{precision_of(self.ds_config)} | grad accum {self.ga} | method {self.method_cfg.method} | "
              f"data {self.data_dir}", flush=True)
        print("sampling probabilities: " + ", ".join(
            f"{n} {p:.3f}" for n, p in zip(self.train_data.names, self.probs)), flush=True)

    def _saved_meta(self) -> tuple[dict, Path] | tuple[None, None]:
        """megavac.json of the checkpoint chosen for --resume (it verified, so it is readable)."""
        if self.resume_tag is None:
            return None, None
        f = self.checkpointer.tag_dir(self.resume_tag) / "megavac.json"
        try:
            return json.loads(f.read_text()), f
        except (OSError, ValueError) as e:  # a checkpoint written before checksums existed
            raise ValueError(f"--resume: {f} cannot be read: {e}") from None

    def _check_resume_settings(self) -> dict:
        """Refuse, by name, a resume on other data or with settings that cannot change; return the
        settings that change (applied from here on)."""
        saved, where = self.resume_from
        if saved is None:
            return {}
        check_data_fingerprint(saved.get("data_fingerprint"), self.data_dir, f"the run in {self.cfg.save_dir}",
                               names=self.train_data.names, same_langs=True)
        return resume_check.compare(saved.get("settings"), self.settings, str(where))

    def _apply_lr(self, lr: float):
        """The restored schedule keeps the checkpoint's peak lr: rescale it to the new one."""
        sched = self.engine.lr_scheduler
        factor = sched.lr_lambdas[0](sched.last_epoch)
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group in self.engine.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * factor

    def _resume(self):
        changed = self._check_resume_settings()
        if self.reshard:
            self._resume_resharded(changed)
            return
        if self.resume_tag is None:
            if self.rank == 0:
                print(f"--resume: no checkpoint in {self.checkpointer.root}, starting from scratch", flush=True)
            return
        state, rank_state = self.checkpointer.load_latest(self.engine, tag=self.resume_tag)
        self.step = state["step"]
        self._load_method_state(state, self.checkpointer.root)
        self.sampler.load_state_dict(rank_state["sampler"])
        if "lr" in changed:
            self._apply_lr(changed["lr"][1])
        if self.rank == 0:
            print(f"resumed from step {self.step} ({self.checkpointer.root})", flush=True)
            for key, (old, new) in changed.items():
                print(f"--resume: {key} changed from {old!r} to {new!r}; applied from step {self.step + 1}", flush=True)
            if self.step >= self.cfg.max_steps:
                print(f"--resume: the checkpoint is at step {self.step} >= --max-steps {self.cfg.max_steps}: "
                      "nothing to train", flush=True)

    def _load_method_state(self, state: dict, where):
        if self.pergrad is None:
            return
        if "method" in state:
            self.pergrad.load_state_dict(state["method"])
        elif self.method_cfg.method != "monolithic":  # monolithic with Gram logging has nothing to restore
            raise ValueError(f"--resume with --method {self.method_cfg.method}: the checkpoint in {where} holds no "
                             "method state (it was trained without a method)")

    def _resume_resharded(self, changed: dict):
        saved, _ = self.resume_from
        root, tag = self.checkpointer.root, self.resume_tag
        state, samplers = reshard.load(self.engine, root, tag, saved, self.rank, self.dp_rank)
        self.step = state["step"]
        self.checkpointer.best_loss = state["best_loss"]
        self._load_method_state(state, root / tag)
        dropped = self.sampler.load_resharded(samplers)
        torch.manual_seed(self.cfg.seed * 1000 + self.rank + 7919 * self.step)  # the old ranks' streams are gone
        if "lr" in changed:
            self._apply_lr(changed["lr"][1])
        self._converted = tag
        if self.rank == 0:
            old_world, old_stages = reshard.layout(saved)
            print(f"resumed from step {self.step} ({root / tag}) on another layout: world_size {old_world} → "
                  f"{self.world}, pipeline_stages {old_stages} → {self.stages}; weights, optimizer and method "
                  f"state restored exactly; the data stream was re-dealt ({dropped} micro-batches of the pool in "
                  f"progress skipped per rank, none repeated); dropout streams seeded anew", flush=True)
            for key, (old, new) in changed.items():
                print(f"--resume: {key} changed from {old!r} to {new!r}; applied from step {self.step + 1}", flush=True)

    def train_step(self) -> LossTally:
        """One optimizer update over ``ga`` micro-batches; returns this rank's per-language loss tally."""
        batches = [collate(self.train_data, next(self.sampler), self.model_cfg.max_positions).to(self.device)
                   for _ in range(self.ga)]
        if self.pergrad is None:
            return self.plain_step(batches)
        out = self.pergrad.run(batches, self.step)
        if out.gram_step and (self.step + 1) % self.cfg.lang_log_interval == 0:
            self.metrics.write(self.step + 1, "method", out.lang_log(self.train_data.names))
        return out.tally

    def validate(self) -> float:
        out = self.validator.run(self.engine)
        self.metrics.write(self.step, "valid", out)
        if self.rank == 0:
            per = ", ".join(f"{n} {v:.3f}" for n, v in out["nll"].items())
            missing = f" | no dev data: {', '.join(out['missing'])}" if out.get("missing") else ""
            print(f"valid step {self.step} | avg nll {out['avg_nll']:.4f} | {per}{missing}", flush=True)
        return out["avg_nll"]

    def save(self, val_loss: float | None):
        global_state = {"method": self.pergrad.state_dict()} if self.pergrad is not None else {}
        self.checkpointer.save(self.engine, self.step, global_state=global_state,
                               rank_state={"sampler": self.sampler.state_dict()}, val_loss=val_loss)
        if self._converted and self.rank == 0:  # the run's own layout is on disk now
            reshard.remove_conversion(self.checkpointer.root, self._converted)
            self._converted = None

    def _log_languages(self, tally: LossTally):
        nll = tally.mean_nll().tolist()
        ratios = distributed.all_reduce_sum(torch.tensor(self.sampler.counts, dtype=torch.float64))
        ratios = (ratios / ratios.sum().clamp(min=1)).tolist()
        self.metrics.write(self.step, "lang", {"nll": dict(zip(self.train_data.names, nll)),
                                               "sampled": dict(zip(self.train_data.names, ratios))})
        if self.rank == 0:
            print("per-language train nll / realised sampling ratio (target): " + ", ".join(
                f"{n} {x:.3f}/{r:.3f}({p:.3f})" for n, x, r, p in zip(self.train_data.names, nll, ratios, self.probs)),
                flush=True)

    def _checked(self, tally: LossTally) -> LossTally:
        self.guard.check_loss(self.step, tally.loss)
        return tally

    def train(self):
        cfg = self.cfg
        window = LossTally(self.K, device=self.device)  # on the device: read only at the log interval
        self.metrics.start(self.step)
        val_loss = None
        self.guard.after_step(self.step, self.engine.skipped_steps)  # the baseline: a first skip counts
        try:
            while self.step < cfg.max_steps:
                window += self.train_step()
                self.step += 1
                self.guard.after_step(self.step, self.engine.skipped_steps)
                last = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or last:
                    g = self._checked(window.all_reduce())
                    self.metrics.progress(self.step, g.loss, self.engine.get_lr()[0], int(g.tokens))
                    if self.step % cfg.lang_log_interval == 0 or last:
                        self._log_languages(g)
                    window.zero_()
                stopping = self.preemption.should_stop(step=self.step)  # every rank agrees: same step
                scheduled = self.step % cfg.save_interval == 0 or last
                if scheduled or stopping:  # the losses since the last progress line, before a checkpoint
                    self._checked(window.all_reduce())
                validating = scheduled or (self.step % cfg.valid_interval == 0 and not stopping)
                if validating:  # preempted: save at once, without a validation pass
                    val_loss = self.validate()
                    self.guard.check_loss(self.step, val_loss, "the validation loss")
                if scheduled or stopping:
                    self.save(val_loss if validating else None)
                if stopping:
                    break
        finally:  # also on divergence: the metrics so far are flushed and the run dir is free again
            self.metrics.close()
            self.lock.release()
        if self.preemption.stop_signal is not None:
            self.preemption.finish(self.step, done=self.step >= cfg.max_steps)
        return val_loss

    def _lock_save_dir(self, save_dir: str) -> RunLock:
        """Rank 0 takes the run directory's lock; every rank refuses alike when another run holds it."""
        lock, error = RunLock(save_dir), ""
        if self.rank == 0:
            try:
                taken = lock.acquire()
                if taken:
                    print(taken, flush=True)
            except ValueError as e:
                error = str(e)
            except OSError as e:  # a read-only or foreign --save-dir: every rank must hear it, not hang
                error = f"cannot take the run lock in {save_dir}: {e.strerror or e}"
        if distributed.all_reduce_sum(torch.tensor([float(bool(error))], device=self.device)).item():
            raise ValueError(error or f"{save_dir} is in use by another run (rank 0 says which)")
        return lock
