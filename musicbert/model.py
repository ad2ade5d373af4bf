"""The MusicBERT encoder (SPEC §4) and its MLM head; nothing about data or distribution.

Architecture
    token embedding + fixed sinusoidal position encoding (the table ``pos_table`` is a
    registered buffer, so it is saved in checkpoints), then LayerNorm and dropout; ``n_layers``
    post-norm blocks::

        x = LN_attn(x + dropout(attn(x)))
        x = LN_out(x + dropout(ff(x)))      ff(x) = W2(GELU(W1(LN_ff(x))))

    Attention has no bias on its q/k/v/out projections and applies rotary position embedding
    ("rotate half" form: frequency ``i`` turns dims ``i`` and ``i + rotary_dims/2``) to the first
    ``rotary_dims`` dims of each head's queries and keys, in addition to the sinusoidal input
    encoding. Every block owns its three LayerNorms. MLM head: Linear(dim, dim) -> GELU ->
    LayerNorm -> Linear(dim, vocab), run only on the positions to predict.

    Dropout (``cfg.dropout``) acts on the embeddings and on both residual branches, as in BERT.
    There is no dropout on the attention probabilities nor inside the feed-forward: attention
    dropout rules out SDPA's fused kernels (on CPU it falls back to materialising ``[.., L, L]``
    probabilities and costs several times the attention itself), and the residual dropouts
    already make the two views of ``BERT-dropout`` differ.

Input (see :class:`musicbert.batch.Batch`)
    ``tokens`` int64 ``[R, L]`` and ``segments`` int64 ``[R, L]``: ``1..k`` number the bars
    packed in a row, 0 marks padding. Attention is kept inside each bar, and both position
    encodings (sinusoidal and rotary) restart at 0 at each bar's first token. A bar's outputs
    therefore do not depend on what else is in its row or batch (padding included): packed
    and unpacked batches give the same numbers up to float rounding. With ``segments=None``
    every row is one bar and ``<pad>`` tokens are padding (the unpacked layout).

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

Outputs (:class:`EncoderOutput`)
    ``mlm_logits`` ``[M, vocab]`` for the ``M`` positions of ``mlm_mask`` in row-major order
    (``None`` without a mask); ``bar_states`` ``[n_layers, n_bars, dim]``: the hidden state of
    each bar's first token (``Bar_0``) after each layer, bars in row-major order of their first
    token (the order of :meth:`Batch.bar_starts`); ``bar_states[-1]`` feeds the contrastive
    loss and ``bar_states[i - 1]`` is the "layer i" bar embedding of SPEC §4. In training mode
    only ``bar_states[-1]`` carries gradient. ``hidden`` is the last layer's ``[R, L, dim]``
    (padding positions hold unspecified values).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from musicbert.config import ATTENTION_LAYOUTS, ModelConfig
from musicbert.vocab import VOCAB

#: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), imported by :func:`plan_varlen` on first
#: use: the import pulls in ``torch._dynamo``, seconds that runs without the ``varlen`` layout need not pay.
varlen_attn = None
_VARLEN_IN_TORCH = importlib.util.find_spec("torch.nn.attention.varlen") is not None


@dataclass
class EncoderOutput:
    mlm_logits: torch.Tensor | None  # [M, vocab] at mlm_mask positions, row-major; None without mlm_mask
    bar_states: torch.Tensor  # [n_layers, n_bars, dim]: first-token state of each bar after each layer
    hidden: torch.Tensor  # [R, L, dim]: last layer's hidden states


# --------------------------------------------------------------------------- positions


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """``[max_len, dim]`` fixed encoding: ``sin`` on even dims, ``cos`` on odd dims (Vaswani et al.)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


def segment_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at each bar, and the flat indices of the bars' first tokens.

    Returns ``positions`` int64 ``[R, L]`` (index of each token inside its bar; 0 on padding)
    and ``starts`` int64 ``[n_bars]`` (indices into the flattened ``[R * L]`` layout, row-major).
    """
    R, L = segments.shape
    prev = F.pad(segments[:, :-1], (1, 0), value=0)
    is_start = (segments > 0) & (segments != prev)
    col = torch.arange(L, device=segments.device).expand(R, L)
    start_col = torch.where(is_start, col, torch.zeros_like(col)).cummax(dim=1).values
    positions = (col - start_col).masked_fill(segments == 0, 0)
    starts = torch.nonzero(is_start.reshape(-1)).squeeze(1)
    return positions, starts


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


# --------------------------------------------------------------------------- blocks


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


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)  # the feed-forward's own input LayerNorm
        self.up = nn.Linear(cfg.dim, cfg.ff_dim)
        self.down = nn.Linear(cfg.ff_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


class Block(nn.Module):
    """Post-norm block; its LayerNorms are its own (the reference shared one pair across blocks)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg)
        self.ff_norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple, plan: AttentionPlan) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, rotary, plan)))
        return self.ff_norm(x + self.dropout(self.ff(x)))


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.decoder = nn.Linear(cfg.dim, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


# --------------------------------------------------------------------------- encoder


def training_flops(cfg: ModelConfig, real_tokens: float, bar_length_sq_sum: float, predicted: float) -> float:
    """Useful FLOPs of one training step of this model: the numerator of MFU (one formula for the
    training loop's log and the benchmarks).

    Counts real tokens only (no padding) and attention inside each bar (``bar_length_sq_sum`` =
    sum over bars of length squared): per layer ``2 x (4 d^2 + 2 d ff)`` per token for the
    projections and feed-forward, ``4 d`` per query-key pair (scores and weighted sum); the MLM
    head on the ``predicted`` positions only. Backward is twice the forward. Embedding lookups,
    norms, softmax and the contrastive loss are left out (a fraction of a percent).
    """
    d, layers = cfg.dim, cfg.n_layers
    dense = 2.0 * real_tokens * layers * (4 * d * d + 2 * d * cfg.ff_dim)
    attention = 4.0 * layers * d * bar_length_sq_sum
    head = 2.0 * predicted * (d * d + d * cfg.vocab_size)
    return 3.0 * (dense + attention + head)



class MusicBERT(nn.Module):
    """The encoder with its MLM head; see the module docstring.

    ``attention`` picks how the per-bar attention is computed (the results agree to float
    rounding; see the module docstring): ``"auto"`` (default) is ``"varlen"`` (flash attention
    over the bars, CUDA with bf16/fp16) where it runs and ``"bars"`` elsewhere; ``"bars"`` groups
    bars by length and runs one dense SDPA per group, so the attention work grows with the sum of
    squared bar lengths rather than with the rows' ``R * L**2``; ``"rows"`` runs SDPA on whole
    rows with a block-diagonal mask.
    """

    def __init__(self, cfg: ModelConfig, pad_id: int = VOCAB.pad_id, attention: str = "auto"):
        super().__init__()
        cfg.validate()
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {list(ATTENTION_LAYOUTS)}, got {attention!r}")
        self.cfg = cfg
        self.pad_id = pad_id
        self.attention = attention
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.register_buffer("pos_table", sinusoidal_table(cfg.max_len, cfg.dim), persistent=True)
        self.embed_norm = nn.LayerNorm(cfg.dim)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.mlm_head = MLMHead(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        segments: torch.Tensor | None = None,
        mlm_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode ``tokens`` ``[R, L]``; see the module docstring for ``segments`` and the outputs."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [rows, length], got shape {tuple(tokens.shape)}")
        R, L = tokens.shape
        if segments is None:
            segments = (tokens != self.pad_id).long()
        positions, starts = segment_positions(segments)
        if L > self.cfg.max_len and bool((positions >= self.cfg.max_len).any()):
            raise ValueError(f"a bar is longer than model.max_len ({self.cfg.max_len}) tokens")
        layout = self.layout_for(tokens.device)
        if layout == "varlen":
            plan = plan_varlen(segments)
        elif layout == "bars" and starts.numel() > 0:
            plan = plan_bars(segments, starts)
        else:
            plan = plan_rows(segments, starts.numel())
        # Rotary cos/sin once per forward, shaped to broadcast over (q|k, head).
        rd = self.cfg.rotary_dims
        if plan.layout != "bars":
            rotary = tuple(t[:, :, None, None, :] for t in rotary_cos_sin(positions, rd))
        else:
            rotary = tuple(t[:, None, None, :] for t in (*rotary_cos_sin(plan.slot_position, rd),
                                                          *rotary_cos_sin(positions.reshape(-1), rd)))

        x = self.embed(tokens) + self.pos_table[positions]
        x = self.embed_dropout(self.embed_norm(x))
        bar_states = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, plan)
            # In training only the last layer's bar states carry gradient (the contrastive loss uses
            # them; no objective uses the others, whose backward would be a full scatter per layer).
            h = x if i == last or not self.training else x.detach()
            bar_states.append(h.reshape(R * L, -1).index_select(0, starts))
        logits = None
        if mlm_mask is not None:
            logits = self.mlm_head(x[mlm_mask])
        return EncoderOutput(mlm_logits=logits, bar_states=torch.stack(bar_states), hidden=x)

    def layout_for(self, device: torch.device) -> str:
        """The attention layout a forward on ``device`` uses now (``auto`` resolved; depends on autocast)."""
        if self.attention not in ("auto", "varlen"):
            return self.attention
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.embed.weight.dtype
        if varlen_usable(device, dtype):
            return "varlen"
        if self.attention == "varlen":
            raise RuntimeError(
                f"attention 'varlen' needs a CUDA GPU with flash attention (sm80+) and bf16/fp16 compute, "
                f"not {device.type} with {dtype}; use attention 'auto' (varlen where it runs, bars elsewhere)"
            )
        return "bars"

    def forward_batch(self, batch) -> EncoderOutput:
        """``forward`` on a :class:`musicbert.batch.Batch`."""
        return self(batch.tokens, batch.segments, batch.mlm_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
