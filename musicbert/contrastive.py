"""NT-Xent (SimCLR) contrastive loss on bar embeddings, with negatives from every rank.

For ``P`` pairs ``(a_i, p_i)`` (anchor = masked bar, positive = its other view) the ``2P``
embeddings ``z = [a_1..a_P, p_1..p_P]`` are L2-normalised and compared by cosine similarity
divided by the temperature ``tau``. Each of the ``2P`` rows is a classification over the other
``2P - 1`` rows whose correct answer is its partner (both directions: anchor -> positive and
positive -> anchor); every other sample in the batch, anchor or positive, is a negative::

    loss = mean over the 2P rows i of  -log( exp(s(i, partner(i)) / tau) / sum_{j != i} exp(s(i, j) / tau) )

The accuracy is the share of those ``2P`` rows whose most similar other row is the partner
(top-1 retrieval of the positive).

Distributed convention (exact): under ``torch.distributed`` the pairs of all ranks form one
global batch (ranks may hold different ``P``, including 0). Each rank gathers every rank's
embeddings with :func:`gather_with_grad` (sizes first, pad to the largest, ``all_gather``,
strip) and computes the **global** loss and accuracy, so every rank returns the same values,
equal to one process's on the concatenated batch. The gather's backward all-reduces (sums)
the gradient over ranks and hands each rank the slice of its own rows. As every rank computed the same global loss, each rank's local embeddings thus
receive ``world_size`` times the single-process gradient, and DDP's average over ranks gives
parameter gradients equal to the single-process gradients on the concatenated batch: nothing
needs rescaling, and the contrastive term is simply added to the rank's (local-mean) MLM loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """All-gather of equally shaped tensors; backward sums gradients over ranks and returns this rank's slice.

    Why not ``torch.distributed.nn.functional.all_gather``: on gloo its backward emulates a
    reduce-scatter with an all-to-all, and 2-rank gloo runs (the CPU tests) hung there
    intermittently, inside a backward that also carries DDP's gradient all-reduces. One
    all-reduce, which every backend has, does the same job here.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[n_r, ...]`` of every rank along dim 0, rank order; ``n_r`` may differ (and be 0).

    Differentiable: the gradient reaching this rank's rows is the sum, over ranks, of the
    gradients their losses put on those rows. Ranks exchange their sizes first and pad to the
    largest, as ``all_gather`` needs equal shapes.
    Without an initialised process group (or with one rank) it returns ``x``. Every rank must
    call it (it is a collective), and all ranks must agree on whether ``x`` requires grad (the
    backward is a collective too).
    """
    if not _distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    if longest == 0:
        return x
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0])) if x.shape[0] < longest else x
    stacked = _AllGather.apply(padded)  # without grad, just the forward
    return torch.cat([stacked[r, :s] for r, s in enumerate(sizes)])


def nt_xent_local(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent loss and top-1 accuracy on the given pairs only (no communication).

    ``anchors`` and ``positives`` are ``[P, dim]``; computed in float32. With ``P = 0`` the loss
    is a zero connected to the inputs (so ``backward`` works) and the accuracy is NaN.
    """
    if anchors.shape != positives.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must both be [P, dim]")
    P = anchors.shape[0]
    if P == 0:
        zero = (anchors.sum() + positives.sum()).float() * 0.0
        return zero, torch.full((), float("nan"), device=anchors.device)
    z = F.normalize(torch.cat([anchors, positives]).float(), dim=1)
    sim = (z @ z.t()) / temperature
    eye = torch.eye(2 * P, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    idx = torch.arange(P, device=z.device)
    partner = torch.cat([idx + P, idx])
    loss = F.cross_entropy(sim, partner)
    with torch.no_grad():
        accuracy = (sim.argmax(dim=1) == partner).float().mean()
    return loss, accuracy


def nt_xent(anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Global NT-Xent over the pairs of all ranks; see the module docstring for the gradient convention.

    Returns ``(loss, accuracy)``, both scalars identical on every rank. Every rank must call it
    in the same step (it communicates when a process group of more than one rank exists).
    """
    if anchors.shape != positives.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must both be [P, dim]")
    pairs = gather_with_grad(torch.stack([anchors, positives], dim=1))  # [P_total, 2, dim]
    return nt_xent_local(pairs[:, 0], pairs[:, 1], temperature)
