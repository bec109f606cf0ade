"""Training configuration: dataclasses (one docstring per field), the CLI built from them, and the
single place where the DeepSpeed JSON is merged with command-line overrides."""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from megavac.model import PRESETS, ModelConfig


@dataclass
class DataConfig:
    data_dir: str = ""
    """Prepared data directory (data_pipeline.prepare). Empty: generate and prepare the synthetic corpus."""
    synthetic_dir: str = "runs/data/synthetic"
    """Where the synthetic corpus and its prepared form are cached when data_dir is empty."""
    langs: str = ""
    """Comma-separated subset of languages, i.e. translation directions (e.g. en-de,en-fr), in the order that
    gives their index; empty: every language of the data dir."""
    temperature: float = 5.0
    """Sampling temperature T: p_i ∝ (n_i/Σn)^(1/T); 1 = proportional, inf = uniform."""
    lang_weights: str = ""
    """Explicit sampling weights 'en-de:2,en-fr:1' (overrides temperature; unlisted languages get 0)."""
    max_tokens: int = 4096
    """Padded tokens per micro-batch per rank (max(source, target) length × rows)."""
    pool_batches: int = 64
    """Micro-batches per rank drawn, length-sorted and shuffled together (less padding when larger)."""
    lang_affine: bool = False
    """Language-affine dealing: pack each drawn pool language by language, so nearly every micro-batch
    (and so every data-parallel rank's share of a step) holds one language; the languages are drawn with
    the same probabilities. A language's gradient then lives on few ranks, and the one-backward
    collector's all-to-all moves about one plain reduce-scatter per language a rank holds."""


def _method_defaults(attr: str) -> str:
    from megavac.methods import METHODS

    return ", ".join(f"{n} {getattr(c, attr)}" for n, c in METHODS.items() if n != "monolithic")


@dataclass
class MethodConfig:
    method: str = "monolithic"
    """Per-language gradient method: monolithic, pcgrad, gradvac, cats, mgda, gradnorm."""
    granularity: str | None = None
    """Parameter groups with their own Gram matrix: whole_model, enc_dec, all_layer, all_matrix; None: the
    method's paper's ({granularities})."""
    langs_per_batch: int | None = None
    """Languages per batch (the sampler draws each pool from this many); None: the method's paper's
    (cats 8, the OPUS-100 setting; all languages otherwise)."""
    gram_log_interval: int = 0
    """Save per-group Gram matrices (npz, with the language order) every N steps; 0 disables."""
    collector: str = "one_backward"
    """How the per-language gradients are computed: one_backward (split out of one backward per
    micro-batch, also inside pipeline stages) or k_backward (the reference: one backward per language;
    under a pipeline, one pipeline micro-batch per language)."""
    options: dict = field(default_factory=dict, metadata={"cli": False})
    """The method's own options (its Options dataclass, --<method>-<option> flags), resolved."""

    def resolve(self) -> "MethodConfig":
        """A copy with the method's defaults filled in and its options validated (ValueError naming them)."""
        from megavac.model.groups import GRANULARITIES
        from megavac.methods import method_class

        cls = method_class(self.method)
        granularity = self.granularity or cls.default_granularity
        if granularity not in GRANULARITIES:
            raise ValueError(f"--granularity {granularity!r} is not one of {list(GRANULARITIES)}")
        lpb = self.langs_per_batch if self.langs_per_batch is not None else (cls.default_langs_per_batch or 0)
        if not isinstance(lpb, int) or lpb < 0:
            raise ValueError(f"--langs-per-batch must be an integer >= 0, got {lpb!r}")
        from megavac.pergrad.collectors import COLLECTORS

        if self.collector not in COLLECTORS:
            raise ValueError(f"--collector {self.collector!r} is not one of {list(COLLECTORS)}")
        if self.gram_log_interval < 0:
            raise ValueError(f"--gram-log-interval must be >= 0, got {self.gram_log_interval}")
        options = asdict(cls.make_options(**self.options))
        return replace(self, granularity=granularity, langs_per_batch=lpb, options=options)


@dataclass
class TrainConfig:
    model: str = "mini"
    """Model size preset: tiny, mini, small, base, big (mini suits the synthetic corpus on CPU)."""
    dropout: float | None = None
    """Dropout; None keeps the preset's value."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross entropy."""
    lr: float | None = None
    """Peak learning rate; None keeps the ds_config optimizer's lr."""
    warmup_steps: int = 200
    """Linear warm-up steps, then inverse square root decay."""
    max_steps: int = 2000
    """Optimizer updates to train for."""
    grad_accum: int | None = None
    """Micro-batches per update; None keeps the ds_config's gradient_accumulation_steps."""
    clip_norm: float | None = None
    """Gradient clipping max norm; None keeps the ds_config's gradient_clipping."""
    zero_stage: int | None = None
    """ZeRO stage override (1, 2, 3); None keeps the ds_config's."""
    precision: str | None = None
    """fp32, bf16 or fp16 override; None keeps the ds_config's."""
    pipeline_stages: int | None = None
    """Pipeline-parallel stages (DeepSpeed PipelineModule, ZeRO-0/1); None keeps the ds_config's
    pipeline.stages, else 1 (no pipeline). The world size must be a multiple of it."""
    layernorm_affine: bool = True
    """LayerNorm gains and biases; --no-layernorm-affine removes them from every LayerNorm (the CATS paper's
    ablation: the model then has no LayerNorm parameters)."""
    family_experts: str = ""
    """Family experts: comma-separated subset of ffn (each feed-forward block), attn (each self- and
    cross-attention block), output (an untied output projection, initialised from the embedding) with one
    copy per language family, each row going through its language's family's copy; empty: none. Training
    runs every copy on every row (F families: F× those modules' compute); not with pipeline stages."""
    family_map: str = ""
    """TSV file of 'language<TAB>family' lines for --family-experts (language: a name like en-de or a pair
    code like de); default: the corpus's families (the synthetic generator's; Glottolog's for real codes)."""
    seed: int = 1
    """Seed for parameters, data order and dropout."""
    save_dir: str = "runs/default"
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/."""
    save_interval: int = 500
    """Save a checkpoint every N updates (and always at the end)."""
    keep_last: int = 2
    """Step checkpoints kept besides the best one."""
    resume: bool = False
    """Continue from save_dir/checkpoints/latest exactly (data order, RNG, optimizer)."""
    log_interval: int = 20
    """Print step, loss, lr, tokens/s and ETA every N updates."""
    lang_log_interval: int = 100
    """Log per-language training loss and realised sampling ratios every N updates."""
    valid_interval: int = 500
    """Per-language validation loss every N updates (and at the end)."""
    valid_max_tokens: int = 8192
    """Padded tokens per validation batch."""
    max_loss: float | None = None
    """Stop as diverged when a logged training loss exceeds this (nats per token); None: 3 × ln(vocab size),
    far worse than a uniform guess. Non-finite training or validation losses always stop the run."""
    max_skipped_steps: int = 50
    """Stop as diverged after this many consecutive updates DeepSpeed skipped as gradient overflows (the
    weights then no longer change); fp16's initial loss-scale search skips fewer than this."""

    def check(self) -> None:
        """ValueError naming the first flag whose value cannot work (checked before anything starts: an
        interval of 0 would otherwise fail only after the first update)."""
        for name in ("max_steps", "save_interval", "log_interval", "lang_log_interval", "valid_interval",
                     "valid_max_tokens", "max_skipped_steps", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("keep_last",):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        if self.max_loss is not None and not (math.isfinite(self.max_loss) and self.max_loss > 0):
            raise ValueError(f"--max-loss must be a finite number > 0, got {self.max_loss!r}")
        from megavac.model import parse_expert_modules

        experts = parse_expert_modules(self.family_experts)  # an unknown module is named before anything starts
        if self.family_map and not experts:
            raise ValueError("--family-map is given without --family-experts (it only routes family experts)")
        if self.family_map and not Path(self.family_map).is_file():
            raise ValueError(f"--family-map {self.family_map} does not exist or is not a file")


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal after each field), for --help."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


def _converter(annotation: str):
    """argparse type for a field annotated 'int', 'float', 'str' or 'X | None' ('none' gives None)."""
    base = {"int": int, "float": float, "str": str}[annotation.split("|")[0].strip()]
    if "None" not in annotation:
        return base
    return lambda text: None if text.lower() == "none" else base(text)


def add_dataclass_args(parser, cls, prefix: str = "", default=None, doc_format: dict | None = None) -> None:
    """One flag per field (``--<prefix>-<field>``), with the field's docstring as help. ``default``
    replaces every field's default in the namespace (argparse.SUPPRESS: only flags given appear)."""
    docs = _field_docs(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + (prefix + "-" if prefix else "") + f.name.replace("_", "-")
        dest = (prefix + "_" if prefix else "") + f.name
        doc = " ".join(docs[f.name].split()).format(**(doc_format or {}))
        value = f.default if default is None else default
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=value, help=doc)
        else:
            parser.add_argument(flag, dest=dest, type=_converter(str(f.type)), default=value,
                                help=f"{doc} (default: {f.default})")


def from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli", True)})


def add_method_args(parser) -> None:
    """--method and the shared options, then each method's own options as --<method>-<option>."""
    from megavac.methods import METHODS

    add_dataclass_args(parser.add_argument_group("per-language gradient methods"), MethodConfig,
                       doc_format={"granularities": _method_defaults("default_granularity")})
    for name, cls in METHODS.items():
        if fields(cls.Options):
            group = parser.add_argument_group(f"--method {name} options")
            add_dataclass_args(group, cls.Options, prefix=name, default=argparse.SUPPRESS)


def method_config_from_args(args: argparse.Namespace) -> MethodConfig:
    """The MethodConfig of the command line, resolved; an option of another method is a ValueError."""
    from megavac.methods import METHODS

    cfg = from_args(MethodConfig, args)
    given = vars(args)
    for name, cls in METHODS.items():
        for f in fields(cls.Options):
            if f"{name}_{f.name}" not in given:
                continue
            if name != cfg.method:
                raise ValueError(f"--{name}-{f.name.replace('_', '-')} is an option of --method {name}, "
                                 f"not of --method {cfg.method}")
            cfg.options[f.name] = given[f"{name}_{f.name}"]
    return cfg.resolve()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a multilingual NMT Transformer with DeepSpeed.")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="ds_configs/zero2.json",
                   help="DeepSpeed JSON config (ds_configs/); command-line flags override its values")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_dataclass_args(p.add_argument_group("data"), DataConfig)
    add_dataclass_args(p.add_argument_group("training"), TrainConfig)
    add_method_args(p)
    return p


def model_config(train: TrainConfig, vocab_size: int, pad_id: int, tasks: list[dict] | None = None,
                 corpus_dir: str | None = None) -> ModelConfig:
    """The model of ``train``'s preset and ablation flags. With --family-experts, ``tasks`` (the training
    languages' meta.json task dicts, in training order) and ``corpus_dir`` (meta.json's ``corpus``) give each
    language's family (megavac.model.routing)."""
    from megavac.model import parse_expert_modules

    if train.model not in PRESETS:
        raise ValueError(f"--model {train.model!r} is not one of {sorted(PRESETS)}")
    kw = dict(PRESETS[train.model], vocab_size=vocab_size, pad_id=pad_id, layernorm_affine=train.layernorm_affine)
    if train.dropout is not None:
        kw["dropout"] = train.dropout
    experts = parse_expert_modules(train.family_experts)
    if experts:
        from megavac.model.routing import family_indices, language_families

        if tasks is None:
            raise ValueError("--family-experts needs the training languages to route them by family")
        families, names = family_indices(language_families(tasks, corpus_dir, train.family_map or None))
        kw.update(expert_modules=",".join(experts), families=families, family_names=names)
    return ModelConfig(**kw)


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}")


def merge_ds_config(ds: dict, train: TrainConfig, world_size: int) -> dict:
    """The one place where CLI flags override the DeepSpeed JSON. Returns a new dict.

    Batches are token-budgeted and built by our sampler, so DeepSpeed's sentence batch size is
    nominal: one "sample" per micro-batch per rank.
    """
    ds = json.loads(json.dumps(ds))
    stages = pipeline_stages(ds, train)
    if world_size % stages:
        raise ValueError(f"world size {world_size} is not divisible by --pipeline-stages {stages}")
    if stages > 1:
        ds["pipeline"] = {**ds.get("pipeline", {}), "stages": stages}
    world_size //= stages  # the data-parallel degree
    ga = train.grad_accum if train.grad_accum is not None else ds.get("gradient_accumulation_steps", 1)
    if not (isinstance(ga, int) and ga >= 1):
        raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {ga!r}")
    ds["gradient_accumulation_steps"] = ga
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["train_batch_size"] = ga * world_size
    if train.clip_norm is not None:
        ds["gradient_clipping"] = train.clip_norm
    if "gradient_clipping" not in ds:
        raise ValueError("the ds_config must set gradient_clipping explicitly (DeepSpeed otherwise clips at 1.0 silently); "
                         "use 0 to disable or pass --clip-norm")
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = opt.setdefault("params", {})
    if train.lr is not None:
        params["lr"] = train.lr
    if "lr" not in params:
        raise ValueError("no learning rate: set optimizer.params.lr in the ds_config or pass --lr")
    if "scheduler" in ds:
        raise ValueError("remove 'scheduler' from the ds_config: megavac applies its inverse-sqrt schedule itself")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if train.zero_stage is not None:
        if train.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage must be 0-3, got {train.zero_stage}")
        zero["stage"] = train.zero_stage
    if train.precision is not None:
        if train.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {train.precision!r}")
        for key in ("bf16", "fp16"):
            ds.setdefault(key, {})["enabled"] = train.precision == key
    if stages > 1 and zero.get("stage", 0) > 1:
        raise ValueError(f"--pipeline-stages {stages} with ZeRO stage {zero['stage']}: DeepSpeed's pipeline engine "
                         "supports ZeRO stage 0 or 1 only (ds_configs/pipeline.json is ZeRO-1)")
    ds.setdefault("steps_per_print", 10**9)  # megavac prints its own progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def pipeline_stages(ds: dict, train: TrainConfig) -> int:
    """Pipeline stages: --pipeline-stages, else the ds_config's pipeline.stages, else 1."""
    stages = train.pipeline_stages
    if stages is None:
        stages = ds.get("pipeline", {}).get("stages", 1)
        stages = 1 if stages == "auto" else stages
    if not (isinstance(stages, int) and stages >= 1):
        raise ValueError(f"pipeline stages must be an integer >= 1, got {stages!r}")
    return stages


def precision_of(ds: dict) -> str:
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled", False):
            return key
    return "fp32"


def parse_lang_weights(text: str, names: list[str]) -> list[float] | None:
    if not text:
        return None
    weights = dict.fromkeys(names, 0.0)
    for item in text.split(","):
        name, _, value = item.partition(":")
        if name not in weights:
            raise ValueError(f"--lang-weights names unknown language {name!r}; the languages are {names}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--lang-weights value {value!r} for {name} is not a number")
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise ValueError(f"--lang-weights value {value!r} for {name} must be finite and >= 0")
    return list(weights.values())


def run_config_dict(data: DataConfig, train: TrainConfig, method: MethodConfig, model: ModelConfig, ds: dict) -> dict:
    return {"data": asdict(data), "train": asdict(train), "method": asdict(method), "model": model.to_dict(),
            "ds_config": ds}


__all__ = ["DataConfig", "MethodConfig", "TrainConfig", "build_parser", "from_args", "merge_ds_config", "method_config_from_args", "model_config",
           "load_ds_config", "precision_of", "parse_lang_weights", "run_config_dict"]
