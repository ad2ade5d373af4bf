"""Attention inside each bar of a packed batch: the layouts, their plans, and the Attention module.

Attention layouts (``MusicBERT(cfg, attention=...)``; same numbers to float rounding)
    ``"auto"`` (default) picks ``"varlen"`` where its kernel runs (a CUDA GPU with flash
    attention, sm80 or newer, bf16/fp16 compute: autocast or half weights) and ``"bars"``
    otherwise (CPU, fp32 on GPU); it is decided per forward, so one model trains in bf16 with
    ``varlen`` and embeds in fp32 with ``bars``.
    ``"varlen"``: flash attention over cumulative sequence lengths
    (:func:`torch.nn.attention.varlen.varlen_attn`) on the flattened ``[R * L]`` tokens, each
    bar one sequence: no grouping, no padding of bars, no gathers, no mask. Padding tokens form
    sequences of their own, cut every :data:`PAD_RUN` tokens so that they cost next to nothing.
    Costs one device-to-host copy (the longest sequence) per forward. CUDA and bf16/fp16 only.
    ``"bars"``: once per forward the bars are cut by length into at most
    :data:`MAX_BAR_GROUPS` groups (:func:`group_bars`), each padded to its longest bar; every layer
    gathers q/k/v into that layout, runs one dense
    :func:`~torch.nn.functional.scaled_dot_product_attention` per group (a ``[n, 1, 1, len]``
    key mask only where the group's bars differ in length) and gathers the outputs back.
    Attention work is then about the sum of squared bar lengths (a row of 1024 holding four
    bars of 256 costs a quarter of the whole-row attention), groups without a mask use the
    flash kernel on GPU, and no ``L x L`` mask is ever built. The two gathers are custom
    autograd functions whose backward is again a gather (no scatter-add). Costs one
    device-to-host copy of the bar lengths per forward and needs bars to be contiguous.
    ``"rows"``: SDPA on whole rows with the ``[R, 1, L, L]`` boolean block-diagonal mask
    (real tokens see their own bar; padding sees only padding, so no row is fully masked and
    nothing is NaN). Simple and cheap to build on CPU for ``L = 1024``; on GPU a boolean mask
    rules out the flash kernel and SDPA uses the memory-efficient kernel. When every row is
    exactly one bar without padding no mask is built.

Rotary position embedding ("rotate half" form) is applied here to the first ``rotary_dims`` dims
of each head's queries and keys (:func:`apply_rotary`; cos/sin once per forward: :func:`rotary_cos_sin`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from musicbert.config import ModelConfig

#: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), imported by :func:`plan_varlen` on first
#: use: the import pulls in ``torch._dynamo``, seconds that runs without the ``varlen`` layout need not pay.
varlen_attn = None
_VARLEN_IN_TORCH = importlib.util.find_spec("torch.nn.attention.varlen") is not None


# --------------------------------------------------------------------------- rotary


def rotary_cos_sin(positions: torch.Tensor, rotary_dims: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[*positions.shape, rotary_dims // 2]`` for :func:`apply_rotary` (once per forward).

    Frequency ``i`` (``base ** (-2i / rotary_dims)``) rotates the pair of dims ``(i, i + rotary_dims / 2)``.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dims, 2, device=positions.device, dtype=torch.float32) / rotary_dims))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., rd/2]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lead: int | None) -> torch.Tensor:
    """A copy of ``x`` with dims ``(i, i + h)`` of its last dim, ``i < h = cos.shape[-1]``, rotated.

    With ``lead`` set, only ``x[..., :lead, :, :]`` is rotated (q and k of a stacked
    ``[..., 3, H, head_dim]`` q/k/v tensor); the rest is copied unchanged.
    """
    h = cos.shape[-1]
    pre = (Ellipsis, slice(None, lead), slice(None)) if lead is not None else (Ellipsis,)
    first, second = pre + (slice(0, h),), pre + (slice(h, 2 * h),)
    out = x.clone(memory_format=torch.contiguous_format)
    out[first].mul_(cos).addcmul_(x[second], sin, value=-1.0)  # x1 cos - x2 sin
    out[second].mul_(cos).addcmul_(x[first], sin)  # x2 cos + x1 sin
    return out


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lead: int | None) -> torch.Tensor:
    """In-place :func:`_rotate` (for tensors the caller owns); returns ``x``."""
    h = cos.shape[-1]
    pre = (Ellipsis, slice(None, lead), slice(None)) if lead is not None else (Ellipsis,)
    x1, x2 = x[pre + (slice(0, h),)], x[pre + (slice(h, 2 * h),)]
    t = x1.clone()
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)
    x2.mul_(cos).addcmul_(t, sin)
    return x


class _Rotary(torch.autograd.Function):
    """Rotary embedding as one autograd node: a rotation, so the backward is the inverse rotation.

    Five kernels each way, instead of the slices, negation, concatenations and their zero-filled
    slice gradients of the usual "rotate half" expression.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, lead):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.lead = lead
        return _rotate(x, cos, sin, lead)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin, ctx.lead), None, None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lead: int | None = None) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x``'s last dim; the remaining dims pass through.

    "Rotate half" convention: frequency ``i`` rotates dims ``(i, i + rotary_dims / 2)``. ``cos``
    and ``sin`` (from :func:`rotary_cos_sin`) broadcast against ``x[..., :rotary_dims / 2]``.
    ``lead=2`` on a ``[..., 3, H, head_dim]`` q/k/v stack rotates q and k only.
    """
    if cos.shape[-1] == 0:
        return x
    return _Rotary.apply(x, cos, sin, lead)


# --------------------------------------------------------------------------- attention layouts

#: The "bars" attention layout runs at most this many SDPA calls per layer: bars sorted by length
#: are cut into at most this many groups, each padded to its longest bar. Each call costs a fixed
#: overhead (which matters on busy CPUs), each group's padding costs attention work.
MAX_BAR_GROUPS = 4


def group_bars(lengths: torch.Tensor, max_groups: int = MAX_BAR_GROUPS, step: int = 32) -> list[torch.Tensor]:
    """Partition bars (by index) into at most ``max_groups`` groups of similar length (host tensors).

    Bars sorted by length start in classes of ``step`` tokens; the two neighbouring groups whose
    merge adds the least attention work (``n * longest**2``) are merged until ``max_groups`` remain.
    Python work is over at most ``512 / step`` classes, never over bars.
    """
    order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[order]
    fine = torch.div(sorted_len + step - 1, step, rounding_mode="floor")
    cuts = (torch.nonzero(fine[1:] != fine[:-1]).squeeze(1) + 1).tolist()
    bounds = [0, *cuts, len(order)]
    longest = sorted_len.tolist()
    groups = [[a, b] for a, b in zip(bounds[:-1], bounds[1:])]  # ranges of the sorted order
    while len(groups) > max_groups:
        costs = [(g[1] - g[0]) * (longest[h[1] - 1] ** 2 - longest[g[1] - 1] ** 2) for g, h in zip(groups[:-1], groups[1:])]
        i = costs.index(min(costs))
        groups[i : i + 2] = [[groups[i][0], groups[i + 1][1]]]
    return [order[a:b] for a, b in groups]


@dataclass
class AttentionPlan:
    """How attention is computed in one forward; built once, shared by all layers.

    ``rows`` layout: ``mask`` is the ``[R, 1, L, L]`` block-diagonal boolean mask (``None`` when
    every row is exactly one bar).

    ``varlen`` layout: ``cu_seqlens`` int32 ``[N + 1]`` are the offsets in the flat ``[R * L]``
    layout where each of the ``N`` sequences (bars, and runs of padding) starts, then ``R * L``;
    ``max_len`` is the longest sequence.

    ``bars`` layout: the ``S`` *slots* hold the bars grouped by length, each group padded
    to its longest bar. ``slot_token`` ``[S]`` is the flat token index of each slot (padding
    slots repeat their bar's first token; ``slot_real`` ``[S]`` is False there), ``token_slot``
    ``[T]`` the slot of each token (``S``, a zero row, for padding tokens; ``token_real``
    False there), ``slot_position`` ``[S]`` the position inside its bar, and ``groups`` lists ``(offset, n, length, key_mask)`` per group, with the
    ``[n, 1, 1, length]`` key mask ``None`` when all ``n`` bars have that length.
    """

    layout: str
    mask: torch.Tensor | None = None
    groups: list[tuple[int, int, int, torch.Tensor | None]] | None = None
    slot_token: torch.Tensor | None = None
    slot_real: torch.Tensor | None = None
    slot_position: torch.Tensor | None = None
    token_slot: torch.Tensor | None = None
    token_real: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0


def plan_rows(segments: torch.Tensor, n_bars: int) -> AttentionPlan:
    if n_bars == segments.shape[0] and bool((segments > 0).all()):
        return AttentionPlan("rows", mask=None)
    # Real tokens see their own bar; padding sees padding only (no fully masked row, no NaN).
    return AttentionPlan("rows", mask=segments[:, None, :, None] == segments[:, None, None, :])


#: ``varlen`` cuts runs of padding into sequences of at most this many tokens: a padding token
#: attends to its run only, so a run costs ``PAD_RUN`` x its length instead of its length squared.
PAD_RUN = 128


def plan_varlen(segments: torch.Tensor) -> AttentionPlan:
    """Sequence boundaries for :func:`~torch.nn.attention.varlen.varlen_attn` on the flat ``[R * L]`` tokens.

    A sequence starts at each row's first token, wherever the segment id changes (a new bar, the
    padding after the last bar) and every :data:`PAD_RUN` tokens inside padding. Needs bars to be
    contiguous in their rows (the :class:`~musicbert.batch.Batch` contract).
    """
    global varlen_attn
    if varlen_attn is None:
        from torch.nn.attention.varlen import varlen_attn
    R, L = segments.shape
    col = torch.arange(L, device=segments.device).expand(R, L)
    prev = F.pad(segments[:, :-1], (1, 0), value=-1)  # -1: every row starts a sequence
    starts = (segments != prev) | ((segments == 0) & (col % PAD_RUN == 0))
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([R * L])]).to(torch.int32)
    return AttentionPlan("varlen", cu_seqlens=cu_seqlens, max_len=int(cu_seqlens.diff().max()))


def varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ``varlen`` flash kernel runs on ``device`` for ``dtype`` compute (sm80+, fp16/bf16)."""
    return (
        _VARLEN_IN_TORCH
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def plan_bars(segments: torch.Tensor, starts: torch.Tensor) -> AttentionPlan:
    """Group the bars by length (:func:`group_bars`); each group is one dense SDPA call of ``[n, H, length, d]``.

    Needs every bar to be contiguous in its row (the :class:`~musicbert.batch.Batch` contract).
    Costs one device-to-host copy of the bar lengths per forward.
    """
    device = segments.device
    T = segments.numel()
    token_real = segments.reshape(-1) > 0
    # Bars are contiguous, so bar b spans [starts[b], starts[b] + lengths[b]) of the flat layout.
    bar_of_token = torch.cumsum(torch.zeros(T, dtype=torch.long, device=device).index_fill_(0, starts, 1), 0) - 1
    lengths = torch.bincount(bar_of_token[token_real], minlength=starts.numel())
    lengths_host = lengths.cpu()
    groups, slot_token, slot_real, slot_position = [], [], [], []
    offset = 0
    for members_host in group_bars(lengths_host):
        group_lengths = lengths_host[members_host]
        n, length = members_host.numel(), int(group_lengths.max())
        members = members_host.to(device)
        slot = torch.arange(length, device=device)
        valid = slot[None, :] < lengths[members][:, None]  # [n, length]
        first = starts[members][:, None]
        slot_token.append(torch.where(valid, first + slot[None, :], first).reshape(-1))
        slot_real.append(valid.reshape(-1))
        slot_position.append(slot.repeat(n))
        key_mask = None if int(group_lengths.min()) == length else valid[:, None, None, :]
        groups.append((offset, n, length, key_mask))
        offset += n * length
    slot_token_t, slot_real_t = torch.cat(slot_token), torch.cat(slot_real)
    token_slot = torch.full((T,), offset, dtype=torch.long, device=device)
    token_slot[slot_token_t[slot_real_t]] = torch.nonzero(slot_real_t).squeeze(1)
    return AttentionPlan("bars", groups=groups, slot_token=slot_token_t, slot_real=slot_real_t,
                         slot_position=torch.cat(slot_position), token_slot=token_slot, token_real=token_real)


class _Regather(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is another gather, not a scatter-add.

    Exact when every source row that matters reaches the output exactly once, at the row
    ``back_index`` names: gradient rows where ``back_keep`` is False are zeroed (they belong to
    padding, whose gradient is zero), and source rows past ``len(back_index)`` (a constant zero
    row) get none. Avoids ``index_add``'s zero-fill and scatter.

    With ``rotary = (cos, sin, back_cos, back_sin)`` the gathered q/k/v stack ``[N, 3, H, hd]``
    also gets its q and k rotated in place (``cos``/``sin`` per output row), and the gradient
    the inverse rotation (``back_cos``/``back_sin`` per source row): rotary embedding fused
    into the gather, without a copy of its own.
    """

    @staticmethod
    def forward(ctx, x, index, back_index, back_keep, rotary=None):
        ctx.save_for_backward(back_index, back_keep)
        ctx.n_rows = x.shape[0]
        out = x.index_select(0, index)
        ctx.back_rotary = None
        if rotary is not None:
            cos, sin, back_cos, back_sin = (t.to(x.dtype) for t in rotary)
            _rotate_(out, cos, sin, lead=2)
            ctx.back_rotary = (back_cos, -back_sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        back_index, back_keep = ctx.saved_tensors
        n = back_index.numel()
        out = grad.new_empty((ctx.n_rows, *grad.shape[1:]))
        torch.index_select(grad, 0, back_index, out=out[:n])
        out[:n].masked_fill_(~back_keep.view(-1, *([1] * (grad.dim() - 1))), 0)
        out[n:].zero_()
        if ctx.back_rotary is not None:
            _rotate_(out, *ctx.back_rotary, lead=2)
        return out, None, None, None, None




class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.rotary_dims = cfg.rotary_dims
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # q, k, v projections, stacked
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple, plan: AttentionPlan) -> torch.Tensor:
        """``x`` ``[R, L, D]``; ``rotary``: ``(cos, sin)`` ``[R, L, 1, 1, rotary_dims / 2]`` for ``rows``,
        ``(slot_cos, slot_sin, token_cos, token_sin)`` (``[S | T, 1, 1, rotary_dims / 2]``) for ``bars``;
        ``varlen`` takes the ``rows`` form."""
        R, L, D = x.shape
        H, hd = self.n_heads, self.head_dim
        qkv = self.qkv(x).view(R, L, 3, H, hd)
        if plan.layout == "varlen":
            qkv = apply_rotary(qkv, *rotary, lead=2)
            q, k, v = qkv.view(R * L, 3, H, hd).unbind(1)  # [T, H, hd] each
            y = varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_len, plan.max_len)
            return self.out(y.reshape(R, L, D))
        if plan.layout == "rows":
            qkv = apply_rotary(qkv, *rotary, lead=2)  # rotates q and k
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [R, H, L, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask)
            return self.out(y.transpose(1, 2).reshape(R, L, D))
        # Tokens -> slots (bars grouped by length), rotating q and k on the way; the gradient comes
        # back by the inverse gather and rotation.
        back = plan.token_slot.clamp(max=plan.slot_token.numel() - 1)
        rot = rotary if self.rotary_dims else None
        slots = _Regather.apply(qkv.reshape(R * L, 3, H, hd), plan.slot_token, back, plan.token_real, rot)
        outs = []
        sizes = [n * length for _, n, length, _ in plan.groups]
        # split (not slicing): its backward is one cat, not a zero-filled full-size tensor per group.
        for (_, n, length, key_mask), group in zip(plan.groups, slots.split(sizes)):
            q, k, v = group.view(n, length, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [n, H, length, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
            outs.append(y.transpose(1, 2).reshape(n * length, D))  # a view: SDPA returns [n, length, H, hd] memory
        outs.append(outs[0].new_zeros(1, D))  # padding tokens read this zero row
        y = _Regather.apply(torch.cat(outs), plan.token_slot, plan.slot_token, plan.slot_real)
        return self.out(y.view(R, L, D))
