#!/usr/bin/env python3
"""PyTorch's side of benches/reference/memory.sh (outside CI, any Python with torch):
the same GPT as Sheaf's job (nanoGPT's, without dropout, the head tied to the token
embedding; pytorch_reference.py's model), AdamW, a global batch of `--batch` windows of
random tokens, `--steps` steps, on `--world` processes over gloo, as

    ddp        DistributedDataParallel
    fsdp       FSDP2: fully_shard per transformer block, then the root, the model built
               on the meta device and materialised sharded (to_empty + init)
    fsdp-ac    the same, each block wrapped in activation checkpointing
               (torch.utils.checkpoint, non-reentrant)

Each rank prints one JSON line: its peak resident memory (getrusage), its resident
memory after importing torch and joining the group (its baseline), and tokens/s over
the steps after the first.

    python benches/reference/pytorch_memory.py --mode fsdp --world 4 --n-layer 8
"""
import argparse, json, os, resource, time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import pytorch_reference as ref


def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Checkpointed(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def run(rank, world, args):
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    baseline = rss_peak()
    torch.manual_seed(0)
    make = lambda: ref.Gpt(vocab=65, block=args.block, n_layer=args.n_layer, n_head=args.n_head, c=args.n_embd)
    if args.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(make())
    else:
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            model = make()
        if args.mode == "fsdp-ac":
            model.h = nn.ModuleList(Checkpointed(b) for b in model.h)
        for blk in model.h:
            fully_shard(blk)
        fully_shard(model)
        model.to_empty(device="cpu")
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    local = args.batch // world
    g = torch.Generator().manual_seed(rank)
    start = None
    for step in range(args.steps):
        if step == 1:
            start = time.perf_counter()
        x = torch.randint(0, 65, (local, args.block + 1), generator=g)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    dist.barrier()
    elapsed = time.perf_counter() - start
    tokens = (args.steps - 1) * args.batch * args.block
    print(json.dumps({"mode": args.mode, "rank": rank, "world": world, "n_layer": args.n_layer,
                      "peak_rss_bytes": rss_peak(), "baseline_rss_bytes": baseline,
                      "tokens_per_sec": tokens / elapsed}), flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "fsdp", "fsdp-ac"], default="ddp")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--port", type=int, default=29741)
    args = p.parse_args()
    mp.spawn(run, args=(args.world, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
