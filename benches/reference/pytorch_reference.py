#!/usr/bin/env python3
"""PyTorch references for Sheaf's throughput comparisons (run outside CI, with any
Python that has torch): the two reference workloads, single process or DDP over gloo,
reporting the median throughput of several timed passes as one JSON line.

    python benches/reference/pytorch_reference.py --workload mlp --threads 1
    python benches/reference/pytorch_reference.py --workload gpt --world 2 --threads 1

mlp: 784-512-512-10 ReLU, SGD momentum 0.9, lr 0.05, global batch 256, synthetic inputs
     (samples/s; Sheaf: `sheaf bench train` on the same shapes).
gpt: benches/reference/gpt.toml's model (n_layer 4, n_head 4, n_embd 128, block 128),
     AdamW, global batch 32 windows of random tokens from a 65-token vocabulary
     (tokens/s). The model is nanoGPT's, without dropout, written out below.

--loop compute (the default) times forward, backward and the optimizer on one batch,
made once: PyTorch's best case. --loop job does every step what Sheaf's reference job
does besides: a new batch each step (mlp: rows gathered from 60,000 synthetic samples in
an order shuffled each epoch; gpt: windows at random offsets of 1M tokens), the global
gradient norm (clip_grad_norm_ to 1.0 for the gpt, as its job clips; get_total_norm for
the mlp, whose job only reports it: clip_grad_norm_ would also scale every gradient by
1), and the loss read back, as Sheaf logs it.
"""
import argparse, json, os, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.nh = nh

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class Gpt(nn.Module):
    def __init__(self, vocab=65, block=128, n_layer=4, n_head=4, c=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(block, c)
        self.h = nn.ModuleList(Block(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def run(rank, world, args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    job = args.loop == "job"
    if args.workload == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        per = 256 // world
        if job:
            xs, ys = torch.randn(60000, 784), torch.randint(0, 10, (60000,))
            order, at = torch.randperm(60000), [0]

            def batch():
                if at[0] + 256 > len(order):
                    order[:] = torch.randperm(60000)
                    at[0] = 0
                rows = order[at[0] + rank * per : at[0] + (rank + 1) * per]
                at[0] += 256
                return xs[rows], ys[rows]
        else:
            fixed = torch.randn(per, 784), torch.randint(0, 10, (per,))
            batch = lambda: fixed
        step = lambda b: F.cross_entropy(model(b[0]), b[1])
        unit, items, clip = "samples/s", 256, None
    else:
        model = Gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        per = 32 // world
        if job:
            tokens, window = torch.randint(0, 65, (1 << 20,)), torch.arange(129)

            def batch():
                return tokens[torch.randint(0, len(tokens) - 129, (per, 1)) + window]
        else:
            fixed = torch.randint(0, 65, (per, 129))
            batch = lambda: fixed
        step = lambda idx: model(idx[:, :-1], idx[:, 1:])
        unit, items, clip = "tokens/s", 32 * 128, 1.0
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    rates = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            loss = step(batch())
            loss.backward()
            if job and clip is None:
                torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            elif job:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if job:
                loss.item()
        rates.append(items * args.steps / (time.perf_counter() - t0))
    if rank == 0:
        print(json.dumps({"workload": args.workload, "world": world, "threads": args.threads, "unit": unit, "loop": args.loop,
                          "median": statistics.median(rates), "passes": rates}))
    if world > 1:
        torch.distributed.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=["mlp", "gpt"], default="mlp")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--port", type=int, default=29731)
    p.add_argument("--loop", choices=["compute", "job"], default="compute")
    args = p.parse_args()
    if args.world > 1:
        os.environ["MASTER_PORT"] = str(args.port)
        torch.multiprocessing.spawn(run, args=(args.world, args), nprocs=args.world)
    else:
        run(0, 1, args)


if __name__ == "__main__":
    main()
