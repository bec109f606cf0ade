#!/usr/bin/env python
"""Train a multilingual NMT Transformer with DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json            # synthetic corpus, all defaults
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json --data-dir data/opus100
    mpirun -np 2 python launch/train.py --ds_config ds_configs/zero2.json
    deepspeed --num_gpus 4 launch/train.py --ds_config ds_configs/pipeline.json   # 2 stages × 2 data-parallel
    python launch/train.py --dry-run --world-size 64 --model big ...        # check the plan, no GPUs
    python launch/train.py --help                                           # every option
"""
from __future__ import annotations

import os
import sys
import warnings

from megavac.config import DataConfig, TrainConfig, build_parser, from_args, method_config_from_args


def main(argv=None):
    # DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 marks deprecated: noise for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from megavac.train import dry_run

    parser = build_parser()
    dry_run.add_dry_run_args(parser)
    args = parser.parse_args(argv)
    data, train = from_args(DataConfig, args), from_args(TrainConfig, args)
    try:
        train.check()  # intervals and counts, before anything starts
        method = method_config_from_args(args)  # the method's paper defaults filled in, options validated
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.dry_run:  # no distributed init, no DeepSpeed engine
        return dry_run.main(data, train, method, args.ds_config, args.world_size)
    if args.world_size is not None:
        parser.error("--world-size is a dry-run option (the launcher sets the world size)")
    from megavac import distributed
    from megavac.train.trainer import Trainer

    from megavac.train.divergence import DivergenceError

    # User errors, divergence (named step, no checkpoint written for it) and failed saves (CheckpointWriteError,
    # a ValueError: `latest` did not move): one line, no traceback. The process group is left without its barrier (the other ranks may
    # have stopped elsewhere), but this node's shared-memory buffers are released.
    try:
        trainer = Trainer(data, train, method, args.ds_config)
        trainer.train()
    except (ValueError, DivergenceError) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: the ranks' lines do not interleave on a shared pipe
        sys.stderr.flush()
        distributed.release_shared_memory()
        return 3 if isinstance(e, DivergenceError) else 2
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    rc = main()
    # Skip the interpreter's teardown: C++ threads of the communication libraries (gloo, DeepSpeed's CPU
    # comm ops) are sometimes destroyed while joinable there, which aborts a run that finished correctly
    # ("terminate called without an active exception", exit 250 under the deepspeed launcher). Everything
    # the run writes is closed by now (checkpoints, metrics, TensorBoard); flush what is printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)
