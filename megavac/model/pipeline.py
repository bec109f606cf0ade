"""The Transformer as a ``deepspeed.pipe.PipelineModule``, and the pieces a pipelined run needs.

The same architecture as ``megavac.model.Transformer``, cut into a sequence of layers that DeepSpeed
partitions over pipeline stages (by parameter count, ``partition_method="parameters"``):

====  ================  ===========================================  ================================
idx   layer             input → output                               parameters (plain model name)
====  ================  ===========================================  ================================
0     EmbedPipe (tied)  (src, tgt_in) → (x, y, src)                  embed.weight
1..E  EncoderLayerPipe  (x, y, src) → (x', y, src)                   encoder.<i>.*
E+1   EncoderNormPipe   (x, y, src) → (y, memory, src)               enc_norm.*
 ..   DecoderLayerPipe  (y, memory, src) → (y', memory, src)         decoder.<j>.*
      (last one)        (y, memory, src) → y'
      DecoderNormPipe   y → y                                        dec_norm.*
last  output (tied)     y → logits                                   (embed.weight, the same tensor)
====  ================  ===========================================  ================================

Both embeddings are computed on the first stage, so the tied embedding lives on exactly two stages:
the first (as ``EmbedPipe``) and the last (the output projection, through ``TiedLayerSpec``'s
``forward_fn``); DeepSpeed sums its two gradients across them. The target embedding rides through the
encoder stages as an activation. Every floating tensor that crosses a stage boundary is used further
on, so each one receives a gradient (DeepSpeed's pipeline engine requires that); this is why the last
decoder layer drops ``memory``. The padding mask is rebuilt from ``src`` on each stage: integer
tensors travel between stages without gradients, booleans would need DeepSpeed's mask hack.

The loss (``PipelineLoss``) runs on the last stage: Σ_k w_k · language k's share of the micro-batch
loss, normalised by ``labels[2]`` tokens (the whole batch's, also when a micro-batch is one language's
rows of it). It records per-language sums for logging and validation.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megavac.loss import LossTally, per_language_losses
from megavac.model import DecoderLayer, EncoderLayer, ModelConfig, embed_tokens, init_embedding, key_mask, layer_norm


# ------------------------------------------------------------------------------------------ layers
class EmbedPipe(nn.Module):
    """Token embedding shared by source, target and the output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        init_embedding(self, cfg)

    def forward(self, inputs):
        src, tgt_in = inputs
        return embed_tokens(self, src), embed_tokens(self, tgt_in), src

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Tied output projection (the last stage's use of this layer), as ``Transformer.project``."""
        return F.linear(y, self.embed.weight)


def output_projection(embed: EmbedPipe, y: torch.Tensor) -> torch.Tensor:
    return embed.project(y)


class EncoderLayerPipe(EncoderLayer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.pad_id = cfg.pad_id

    def forward(self, inputs):
        x, y, src = inputs
        return super().forward(x, key_mask(src, self.pad_id)), y, src


class EncoderNormPipe(nn.Module):
    """The encoder's final norm; hands the decoder (target stream, memory, src)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = layer_norm(cfg) if cfg.pre_ln else nn.Identity()

    def forward(self, inputs):
        x, y, src = inputs
        return y, self.norm(x), src


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, cfg: ModelConfig, last: bool):
        super().__init__(cfg)
        self.pad_id, self.last = cfg.pad_id, last

    def forward(self, inputs):
        y, memory, src = inputs
        y = super().forward(y, memory, key_mask(src, self.pad_id))
        return y if self.last else (y, memory, src)


class DecoderNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = layer_norm(cfg) if cfg.pre_ln else nn.Identity()

    def forward(self, y):
        return self.norm(y)


# ------------------------------------------------------------------------------------------ layout
def plain_prefix(cfg: ModelConfig, idx: int) -> str:
    """The plain Transformer's name prefix for the parameters of pipeline layer ``idx``."""
    E, D = cfg.enc_layers, cfg.dec_layers
    if idx == 0 or idx == E + D + 3:
        return ""  # EmbedPipe: its "embed.weight" is the plain model's name already
    if idx <= E:
        return f"encoder.{idx - 1}."
    if idx == E + 1:
        return "enc_norm."
    if idx <= E + D + 1:
        return f"decoder.{idx - E - 2}."
    assert idx == E + D + 2, idx
    return "dec_norm."


def num_layers(cfg: ModelConfig) -> int:
    """The pipeline's layer specs (the table above): DeepSpeed cuts stages between specs, so this is also
    the most pipeline stages the model allows."""
    return len(layer_specs(cfg))


def check_stages(cfg: ModelConfig, num_stages: int) -> None:
    """ValueError unless the model can be cut into ``num_stages`` pipeline stages. Family experts are refused:
    their routing needs each row's language on every stage, which the pipeline's activations do not carry."""
    if num_stages > 1 and cfg.experts:
        raise ValueError(f"--family-experts {cfg.expert_modules} is not supported with pipeline parallelism "
                         f"(--pipeline-stages {num_stages}): the pipeline's stages do not receive each row's language; "
                         "train family experts without a pipeline (ZeRO-1/2/3)")
    if num_stages > num_layers(cfg):
        raise ValueError(f"--pipeline-stages {num_stages} exceeds the model's {num_layers(cfg)} pipeline layers "
                         f"({cfg.enc_layers} encoder + {cfg.dec_layers} decoder layers, the embedding, the output "
                         "projection and the two final norms)")


_PIPE_NAME = re.compile(r"^(\d+)\.(.*)$")
_TIED = "tied_modules.embed."


def plain_name(cfg: ModelConfig, pipe_name: str) -> str:
    """``Transformer.named_parameters()`` name of a ``TransformerPipe`` parameter."""
    if pipe_name.startswith(_TIED):
        return pipe_name[len(_TIED):]
    m = _PIPE_NAME.match(pipe_name)
    if not m:
        raise ValueError(f"{pipe_name!r} is not a TransformerPipe parameter name")
    idx, rest = int(m.group(1)), m.group(2)
    prefix = plain_prefix(cfg, idx)
    if prefix in ("enc_norm.", "dec_norm."):
        rest = rest.removeprefix("norm.")
    return prefix + rest


def layer_specs(cfg: ModelConfig) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied = dict(tied_weight_attr=["embed.weight"])
    return [
        TiedLayerSpec("embed", EmbedPipe, cfg, **tied),
        *[LayerSpec(EncoderLayerPipe, cfg) for _ in range(cfg.enc_layers)],
        LayerSpec(EncoderNormPipe, cfg),
        *[LayerSpec(DecoderLayerPipe, cfg, i == cfg.dec_layers - 1) for i in range(cfg.dec_layers)],
        LayerSpec(DecoderNormPipe, cfg),
        TiedLayerSpec("embed", EmbedPipe, cfg, forward_fn=output_projection, **tied),
    ]


def make_pipeline_module(cfg: ModelConfig, num_stages: int, loss_fn: "PipelineLoss"):
    """The ``PipelineModule`` (this rank's stage only), partitioned by parameter count. Needs
    ``torch.distributed`` initialised; the world size must be a multiple of ``num_stages``."""
    from deepspeed.pipe import PipelineModule

    from megavac.pergrad.ds_adapter import detach_tied_weight_broadcast

    class TransformerPipe(PipelineModule):
        def plain_name(self, name: str) -> str:
            return plain_name(cfg, name)

        def plain_param_names(self) -> list[str]:
            """Every parameter of the whole model (all stages), in ``Transformer`` order."""
            with torch.device("meta"):
                from megavac.model import Transformer

                return [n for n, _ in Transformer(cfg).named_parameters()]

        def plain_state_dict(self) -> dict[str, torch.Tensor]:
            """This stage's parameters under their plain names (the tied embedding on both ends)."""
            return {plain_name(cfg, n): p for n, p in self.named_parameters()}

        @torch.no_grad()
        def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            """Copy this stage's parameters from a plain ``Transformer`` state dict."""
            for n, p in self.plain_state_dict().items():
                if n not in state:
                    raise ValueError(f"plain state dict lacks {n!r}")
                p.copy_(state[n])

    check_stages(cfg, num_stages)
    pipe = TransformerPipe(layers=layer_specs(cfg), num_stages=num_stages, loss_fn=loss_fn,
                           partition_method="parameters", dynamic_shape=True)
    detach_tied_weight_broadcast(pipe)  # no "autograd kernel was not registered" warning on every backward
    return pipe


def plain_state_dict_from_layer_files(tag_dir, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole model from a pipelined checkpoint's ``layer_XX-model_states.pt`` files (DeepSpeed writes
    one per layer with parameters: the module weights, fp32 unless the run was bf16/fp16)."""
    tag_dir = Path(tag_dir)
    out = {}
    for idx in range(num_layers(cfg) - 1):  # the output layer shares layer 0's weight and has no file
        files = sorted(glob.glob(str(tag_dir / f"layer_{idx:02d}-*model_states.pt")))
        if not files:
            if idx in (cfg.enc_layers + 1, cfg.enc_layers + cfg.dec_layers + 2) and not (
                    cfg.pre_ln and cfg.layernorm_affine):
                continue  # post-LN final norms are Identity, norms without affine have no parameters
            raise ValueError(f"pipelined checkpoint {str(tag_dir)!r} lacks layer_{idx:02d}-*model_states.pt")
        state = torch.load(files[0], map_location="cpu", weights_only=True)
        prefix = plain_prefix(cfg, idx)
        for k, v in state.items():
            if prefix in ("enc_norm.", "dec_norm."):
                k = k.removeprefix("norm.")
            out[prefix + k] = v.float() if v.is_floating_point() else v
    return out


# -------------------------------------------------------------------------------------------- loss
class PipelineLoss:
    """``loss_fn`` of the pipeline (last stage): Σ_k w_k loss_k with a tally of what it saw.

    ``labels`` = (tgt_out [B, T], lang [B], total tokens []). ``weights`` None means all ones (plain
    training). ``tally``: a ``LossTally`` of the losses since ``begin``.
    """

    def __init__(self, num_langs: int, pad_id: int, smoothing: float):
        self.K, self.pad_id, self.smoothing = num_langs, pad_id, smoothing
        self.weights: torch.Tensor | None = None
        self.tally = LossTally(num_langs)

    def begin(self, weights: torch.Tensor | None = None):
        self.weights = None if weights is None or bool((weights == 1).all()) else weights.detach().float()
        self.tally = LossTally(self.K)

    def __call__(self, logits, labels):
        tgt_out, lang, total = labels
        loss_k, nll_k, ntok_k = per_language_losses(logits, tgt_out, lang, self.K, self.pad_id, self.smoothing,
                                                    total=total)
        if self.tally.sums.device != loss_k.device:
            self.tally = LossTally(self.K, device=loss_k.device, sums=self.tally.sums.to(loss_k.device))
        self.tally.add(loss_k, nll_k, ntok_k, total)
        if self.weights is None:
            return loss_k.sum()
        return (loss_k * self.weights.to(loss_k)).sum()


def pipeline_items(batches: list) -> list:
    """DeepSpeed's pipeline data: (inputs for the first stage, labels for the last stage) per micro-batch."""
    return [((b.src, b.tgt_in), (b.tgt_out, b.lang, torch.tensor(float(max(b.ntokens, 1)))))
            for b in batches]


class PipelineRunner:
    """The trainer's plain step and validation on a ``PipelineEngine``."""

    def __init__(self, engine):
        self.engine = engine
        self.loss: PipelineLoss = engine.module.loss_fn

    def train_batch(self, batches: list, weights: torch.Tensor | None = None) -> LossTally:
        """One optimizer step over ``batches`` (``gradient_accumulation_steps`` micro-batches) with
        loss weights; returns this rank's tally (zero except on the last stage)."""
        self.loss.begin(weights)
        self.engine.train_batch(iter(pipeline_items(batches)))
        return self.loss.tally

    @torch.no_grad()
    def eval_tally(self, batches: list) -> LossTally:
        """Per-language losses over ``batches`` (zero except on the last stage)."""
        self.loss.begin(None)
        self.engine.eval_batch(iter(pipeline_items(batches)), num_micro_batches=len(batches), reduce_output=None,
                               bcast_loss=False)
        return self.loss.tally
