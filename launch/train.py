#!/usr/bin/env python
"""Train a multilingual NMT Transformer with DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json            # synthetic corpus, all defaults
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json --data-dir data/opus100
    mpirun -np 2 python launch/train.py --ds_config ds_configs/zero2.json
    python launch/train.py --help                                           # every option
"""
from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megavac.config import DataConfig, MethodConfig, TrainConfig, build_parser, from_args  # noqa: E402


def main(argv=None):
    # DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 marks deprecated: noise for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = build_parser().parse_args(argv)
    data, train, method = from_args(DataConfig, args), from_args(TrainConfig, args), from_args(MethodConfig, args)
    from megavac.trainer import Trainer

    try:
        trainer = Trainer(data, train, method, args.ds_config)
    except ValueError as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
