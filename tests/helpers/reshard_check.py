"""Resume a checkpoint written under another layout, then compare what the engine holds with the source.

    deepspeed --num_gpus N tests/helpers/reshard_check.py --source ROOT/TAG [launch/train.py options] --resume

Builds the real ``Trainer`` (which converts and loads the universal checkpoint), then, for every
parameter, compares the engine's full fp32 weight with the source checkpoint consolidated independently
(``zero_to_fp32`` for ZeRO shards, the layer files for a pipeline), and Adam's two moments with the
universal folder's. Rank 0 prints one line ``RESHARD <json>``; nothing is trained.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch


def universal_tensor(path: Path) -> torch.Tensor:
    obj = torch.load(path, weights_only=False)  # ZeRO-1/2 conversions wrap it in {"param": ...}, ZeRO-3's do not
    return obj["param"] if isinstance(obj, dict) else obj


def main(argv):
    warnings.filterwarnings("ignore", category=FutureWarning)
    source = Path(argv[argv.index("--source") + 1])
    argv = argv[:argv.index("--source")] + argv[argv.index("--source") + 2:]
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megavac.config import DataConfig, TrainConfig, build_parser, from_args, method_config_from_args
    from megavac.evaluation.consolidate import consolidated_state_dict, read_meta
    from megavac.model import ModelConfig
    from megavac.model.pipeline import plain_state_dict_from_layer_files
    from megavac.train.reshard import universal_dir
    from megavac.train.trainer import Trainer

    args = build_parser().parse_args(argv)
    trainer = Trainer(from_args(DataConfig, args), from_args(TrainConfig, args), method_config_from_args(args),
                      args.ds_config)
    meta = read_meta(source)
    if any(source.glob("layer_*-model_states.pt")):
        expected = plain_state_dict_from_layer_files(source, ModelConfig(**meta["model"]))
    else:
        expected = consolidated_state_dict(source.parent, source.name)
    conv = universal_dir(source.parent, source.name) / "zero"
    worst = {"weight": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    names = []
    for name, p in trainer.engine.module.named_parameters():
        names.append(name)
        full = safe_get_full_fp32_param(p)
        worst["weight"] = max(worst["weight"], (full - expected[name].float()).abs().max().item())
        for key in ("exp_avg", "exp_avg_sq"):
            moment = safe_get_full_optimizer_state(p, key)
            saved = universal_tensor(conv / name / f"{key}.pt")
            worst[key] = max(worst[key], (moment - saved.view_as(moment)).abs().max().item())
    nonzero = sum(bool(universal_tensor(conv / n / "exp_avg.pt").abs().sum()) for n in names)
    if trainer.rank == 0:
        print("RESHARD " + json.dumps({"step": trainer.step, "params": len(names), "missing": sorted(set(expected) - set(names)),
                                       "nonzero_moments": nonzero, "max_abs_diff": worst}), flush=True)
    trainer.lock.release()


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    import os

    os._exit(0)
