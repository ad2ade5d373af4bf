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

Attention layouts
    ``MusicBERT(cfg, attention=...)``: ``auto``, ``varlen``, ``bars`` or ``rows``, described in
    :mod:`musicbert.attention` (same numbers to float rounding).

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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from musicbert.attention import Attention, AttentionPlan, plan_bars, plan_rows, plan_varlen, rotary_cos_sin, varlen_usable
from musicbert.batch import bar_start_mask
from musicbert.config import ATTENTION_LAYOUTS, ModelConfig
from musicbert.vocab import VOCAB


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
    is_start = bar_start_mask(segments)
    col = torch.arange(L, device=segments.device).expand(R, L)
    start_col = torch.where(is_start, col, torch.zeros_like(col)).cummax(dim=1).values
    positions = (col - start_col).masked_fill(segments == 0, 0)
    starts = torch.nonzero(is_start.reshape(-1)).squeeze(1)
    return positions, starts


# --------------------------------------------------------------------------- blocks


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



def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


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
