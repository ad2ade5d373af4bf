"""NT-Xent (musicbert/contrastive.py): textbook equality and exact multi-rank gradients."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musicbert.contrastive import gather_with_grad, nt_xent, nt_xent_local

sys.path.insert(0, str(Path(__file__).parent))
from dist_contrastive import EMB_DIM, IN_DIM, TEMPERATURE, make_problem  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def textbook_nt_xent(a: torch.Tensor, p: torch.Tensor, tau: float) -> tuple[float, float]:
    """SimCLR's loss written with loops: 2P rows, partner = the other view, all others negatives."""
    rows = torch.cat([a, p]).tolist()
    z = [[e / math.sqrt(sum(f * f for f in row)) for e in row] for row in rows]
    n = len(z)
    P = n // 2
    total, correct = 0.0, 0
    for i in range(n):
        partner = i + P if i < P else i - P
        sims = {j: sum(x * y for x, y in zip(z[i], z[j])) / tau for j in range(n) if j != i}
        denom = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[partner]) / denom)
        correct += int(max(sims, key=sims.get) == partner)
    return total / n, correct / n


@pytest.mark.parametrize("P,dim,tau", [(1, 3, 0.1), (4, 5, 0.1), (7, 16, 0.5)])
def test_nt_xent_equals_textbook(P, dim, tau):
    g = torch.Generator().manual_seed(P)
    a = torch.randn(P, dim, generator=g, dtype=torch.float64)
    p = a + 0.5 * torch.randn(P, dim, generator=g, dtype=torch.float64)
    loss, acc = nt_xent(a, p, tau)
    ref_loss, ref_acc = textbook_nt_xent(a, p, tau)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc)
    # Scale-invariant (cosine similarity) and symmetric in the two views.
    assert nt_xent(3 * a, p, tau)[0].item() == pytest.approx(ref_loss, rel=1e-5)
    assert nt_xent(p, a, tau)[0].item() == pytest.approx(ref_loss, rel=1e-5)


def test_nt_xent_accuracy_and_gradient():
    a = torch.eye(4, dtype=torch.float64, requires_grad=True)
    p = torch.eye(4, dtype=torch.float64) + 0.01
    loss, acc = nt_xent(a, p, 0.1)
    assert acc.item() == 1.0
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    # Swapping the positives of two pairs makes retrieval fail for the rows involved.
    _, acc2 = nt_xent(a.detach(), p[[1, 0, 2, 3]], 0.1)
    assert acc2.item() == pytest.approx(0.5)


def test_nt_xent_no_pairs_is_zero_and_backward_works():
    a = torch.zeros(0, 8, requires_grad=True)
    loss, acc = nt_xent(a, torch.zeros(0, 8), 0.1)
    assert loss.item() == 0.0 and math.isnan(acc.item())
    loss.backward()


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2, 4)
    assert gather_with_grad(x) is x


def test_nt_xent_shape_errors():
    with pytest.raises(ValueError):
        nt_xent_local(torch.zeros(3, 4), torch.zeros(2, 4), 0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(counts: list[int]):
    model, x = make_problem(sum(counts))
    emb = model(x.reshape(-1, IN_DIM)).reshape(-1, 2, EMB_DIM)
    emb.retain_grad()
    loss, acc = nt_xent(emb[:, 0], emb[:, 1], TEMPERATURE)
    loss.backward()
    return loss.item(), acc.item(), [p.grad.flatten() for p in model.parameters()], emb.grad


@pytest.mark.slow
@pytest.mark.parametrize("counts", [[3, 5], [0, 4], [4, 4]])
def test_two_rank_gloo_matches_one_process(tmp_path, counts):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", f"--nproc_per_node={len(counts)}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(REPO / "tests" / "dist_contrastive.py"),
        "--counts", ",".join(map(str, counts)), "--out", str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(len(counts))]

    ref_loss, ref_acc, ref_grads, ref_emb_grad = _reference(counts)
    world = len(counts)
    start = 0
    for r, res in enumerate(ranks):
        assert res["world"] == world
        # Every rank returns the global loss and accuracy.
        assert res["loss"] == pytest.approx(ref_loss, rel=1e-10)
        assert res["accuracy"] == pytest.approx(ref_acc)
        # DDP-averaged parameter gradients equal the single-process ones on the whole batch.
        for got, want in zip(res["param_grads"], ref_grads):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-9, atol=1e-12)
        # Each rank's own embeddings get world_size x the single-process gradient (DDP divides by it).
        n = counts[r]
        if n:
            got = torch.tensor(res["emb_grad"], dtype=torch.float64)
            torch.testing.assert_close(got / world, ref_emb_grad[start : start + n], rtol=1e-9, atol=1e-12)
        start += n
