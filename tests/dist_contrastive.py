"""Worker for tests/test_contrastive.py: one rank of a gloo run of the contrastive loss.

Launched as ``torchrun --nproc_per_node=N tests/dist_contrastive.py --counts 3,5 --out DIR``.
Every rank builds the same global data and tiny model (fixed seeds), keeps its own pairs
(``counts[rank]`` of them, in rank order), wraps the model in DDP, computes
:func:`musicbert.contrastive.nt_xent` and writes ``DIR/rank<r>.json`` with the loss, the
accuracy, the DDP-averaged parameter gradients and the gradient on its local embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from musicbert.contrastive import nt_xent

IN_DIM, EMB_DIM, TEMPERATURE = 6, 5, 0.1


def make_problem(total: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and the global inputs ``[total, 2, IN_DIM]`` (anchor and positive inputs)."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(IN_DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, EMB_DIM)).double()
    x = torch.randn(total, 2, IN_DIM, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.3 * x[:, 1]  # positives resemble their anchors
    return model, x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", required=True, help="pairs per rank, comma-separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [int(c) for c in args.counts.split(",")]
    assert len(counts) == world, (counts, world)
    model, x = make_problem(sum(counts))
    start = sum(counts[:rank])
    local = x[start : start + counts[rank]]
    ddp = DDP(model)
    emb = ddp(local.reshape(-1, IN_DIM)).reshape(-1, 2, EMB_DIM)
    emb.retain_grad()
    loss, acc = nt_xent(emb[:, 0], emb[:, 1], TEMPERATURE)
    loss.backward()
    result = {
        "rank": rank,
        "world": world,
        "loss": loss.item(),
        "accuracy": acc.item(),
        "param_grads": [p.grad.flatten().tolist() for p in model.parameters()],
        "emb_grad": emb.grad.tolist() if emb.grad is not None else [],
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
