"""One DDP rank (run by ``torchrun --nproc-per-node 2 tests/ddp_worker.py OUT.json``): MiniLM with
MoE-LoRA layers under DistributedDataParallel (gloo), each rank on its own batch.

Checks, written by rank 0 to OUT.json: the first step's gradients equal the average of the ranks'
local gradients (computed without DDP and all-reduced by hand), and after three optimiser steps
every rank holds the same parameters.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fedlease import MoELoRAConfig, inject_moe_lora
from fedlease.models import load

TEXTS = [["a fine film", "dull and long"], ["the best of the year", "I walked out"]]


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on every rank
    model, tok = load("minilm", num_labels=2)
    config = MoELoRAConfig(num_experts=3, rank=4, target_modules=["query", "value"],
                           trainable_modules=["classifier"])  # fmt: skip
    inject_moe_lora(model, config)
    with torch.no_grad():
        for name, p in trainable(model).items():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    model.eval()  # no dropout: the local and the DDP gradients see the same network
    batch = tok(TEXTS[rank % len(TEXTS)], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0])

    local = copy.deepcopy(model)
    local(**batch, labels=labels).loss.backward()
    expected = {}
    for name, p in trainable(local).items():
        g = p.grad.clone()
        dist.all_reduce(g)
        expected[name] = g / world

    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(trainable(model).values(), lr=1e-3)
    worst = 0.0
    for step in range(3):
        opt.zero_grad()
        ddp(**batch, labels=labels).loss.backward()
        if step == 0:
            for name, p in trainable(model).items():
                err = (p.grad - expected[name]).norm() / expected[name].norm().clamp_min(1e-30)
                worst = max(worst, err.item())
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in trainable(model).values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        spread = max((g - gathered[0]).abs().max().item() for g in gathered)
        start = torch.cat([p.detach().flatten() for p in trainable(local).values()])
        moved = (flat - start).abs().max().item()
        result = {"world": world, "grad_rel_err": worst, "replica_max_diff": spread,
                  "param_change": moved, "params": len(expected)}  # fmt: skip
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
