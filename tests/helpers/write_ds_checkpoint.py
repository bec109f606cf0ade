"""Train a tiny megavac model one step under DeepSpeed ZeRO and save a checkpoint.

Run directly for a single in-process rank (it sets the rendezvous env vars itself), or through
``deepspeed --num_gpus N`` for N CPU ranks. Rank 0 also writes ``megavac.json`` into the tag
folder and ``reference.pt`` (the engine's full parameters, gathered under ZeRO-3) into --out,
which the tests compare with the consolidated checkpoint.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

from megavac.model import ModelConfig, Transformer

TINY = dict(d_model=32, n_heads=2, enc_layers=1, dec_layers=1, d_ff=64, dropout=0.0,
            max_positions=64)


def ds_config(stage: int, bf16: bool) -> dict:
    return {
        "train_batch_size": int(os.environ["WORLD_SIZE"]),
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1000,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--tag", default="step_1")
    ap.add_argument("--port", default="29511")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--vocab-size", type=int, default=40)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()
    # Single in-process rank: provide what the launcher would.
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port).items():
        os.environ.setdefault(k, v)

    import importlib

    import deepspeed

    # Skip the ~60 s JIT build of DeepSpeed's CPU shared-memory all-reduce: gloo suffices here.
    # (importlib: the attribute deepspeed.comm.torch is the torch package, not the module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab_size, **TINY)
    engine, *_ = deepspeed.initialize(model=Transformer(cfg), config=ds_config(args.stage, args.bf16))

    # One real step, different data per rank so the shards differ.
    g = torch.Generator().manual_seed(rank)
    src = torch.randint(4, cfg.vocab_size, (1, 7), generator=g)
    tgt = torch.randint(4, cfg.vocab_size, (1, 6), generator=g)
    logits = engine(src, tgt[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten())
    engine.backward(loss)
    engine.step()

    out = Path(args.out)
    engine.save_checkpoint(str(out), tag=args.tag)
    params = list(engine.module.named_parameters())
    if args.stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            ref = {n: p.detach().float().clone() for n, p in params}
    else:
        ref = {n: p.detach().float().clone() for n, p in params}
    if rank == 0:
        meta = {"model": cfg.to_dict(), "data_dir": args.data_dir, "step": 1}
        (out / args.tag / "megavac.json").write_text(json.dumps(meta))
        torch.save(ref, out / "reference.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # As launch/train.py: skip the interpreter's teardown, where gloo's C++ threads are sometimes destroyed
    # while joinable ("terminate called without an active exception", exit -6 under the launcher).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
