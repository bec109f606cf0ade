"""Parameter groups of the Transformer for per-language Grams: the model's names, read in one place.

The granularities of the GradVac paper (Section 4.1): one Gram for the whole model, for the encoder and
the decoder, per layer, or per parameter tensor. Coarse Grams are sums of fine ones, so the per-language
step computes Grams per tensor and sums them into the groups given here. The labels parse the names of
``megavac.model.Transformer.named_parameters()`` (the pipeline form maps its names to these).
"""
from __future__ import annotations

import re

import torch

GRANULARITIES = ("whole_model", "enc_dec", "all_layer", "all_matrix")

_LAYER = re.compile(r"^(encoder|decoder)\.(\d+)\.")


def group_label(name: str, granularity: str) -> str:
    """The parameter group of parameter ``name`` (as in ``Transformer.named_parameters()``).

    * whole_model: "model".
    * enc_dec: "embed" / "encoder" / "decoder". The tied embedding (source and target embedding AND the
      output projection) serves both sides, so it is a group of its own rather than part of either:
      put into the decoder, the output projection's gradient (the largest matrix, written by every
      target token) would dominate the decoder's Gram; put into the encoder, it would make the encoder
      group mostly decoder signal. The final norms go with their stacks. Per-family output projections
      (``--family-experts output``: ``output.experts.<f>.weight``) are the group "output", for the same reason.
    * all_layer: "embed", "encoder.<i>", "encoder.norm", "decoder.<i>", "decoder.norm" (and "output").
      Family experts inside a layer (``encoder.<i>.ffn.fn.experts.<f>.*``) belong to that layer.
    * all_matrix: the parameter's own name (one group per tensor, biases and LayerNorm weights too).
    Names outside the Transformer's layout fall back to their first component.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "whole_model":
        return "model"
    if granularity == "all_matrix":
        return name
    side = {"encoder": "encoder", "enc_norm": "encoder", "decoder": "decoder", "dec_norm": "decoder"}
    head = name.split(".", 1)[0]
    if granularity == "enc_dec":
        return side.get(head, head)
    m = _LAYER.match(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if head in ("enc_norm", "dec_norm"):
        return f"{side[head]}.norm"
    return head


def build_groups(names: list[str], granularity: str) -> tuple[list[str], torch.Tensor]:
    """(group labels in order of first appearance, long [P]: group index of every parameter)."""
    labels, index = [], {}
    of_param = []
    for n in names:
        g = group_label(n, granularity)
        if g not in index:
            index[g] = len(labels)
            labels.append(g)
        of_param.append(index[g])
    return labels, torch.tensor(of_param, dtype=torch.long)


def last_shared_layer(param_names: list[str], granularity: str) -> int:
    """GradNorm's W: the group of the last decoder layer (the whole decoder / model when coarser)."""
    names, _ = build_groups(param_names, granularity)
    layers = [i for i, n in enumerate(names) if n.startswith("decoder") and "norm" not in n]
    return layers[-1] if layers else len(names) - 1


def model_param_names(module) -> tuple[list[str], list[str]]:
    """(the ``Transformer`` names of ``module.named_parameters()``, the whole model's ``Transformer`` names).

    A plain ``Transformer`` (or a DeepSpeed engine's module of one) is named as it is; the pipeline form
    (megavac.model.pipeline) holds one stage under DeepSpeed's layer-index names and maps them back.
    """
    own = [n for n, _ in module.named_parameters()]
    to_plain = getattr(module, "plain_name", None)
    if to_plain is None:
        return own, own
    return [to_plain(n) for n in own], module.plain_param_names()
