"""The encoder (musicbert/model.py): padding invariance, packing, heads, structure, dropout views."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import musicbert.attention as attention_mod
import musicbert.model as model_mod
from musicbert.attention import PAD_RUN, apply_rotary, plan_varlen, rotary_cos_sin, varlen_usable
from musicbert.batch import Batch
from musicbert.config import ConfigError, ModelConfig, config_from_dict
from musicbert.contrastive import nt_xent
from musicbert.model import MusicBERT, segment_positions, training_flops
from musicbert.vocab import VOCAB

TINY = dict(vocab_size=len(VOCAB), dim=64, n_layers=2, n_heads=4, ff_dim=128, max_len=128, dropout=0.1, rotary_dims=8)


def tiny_model(seed: int = 0, attention: str = "bars", **kw) -> MusicBERT:
    torch.manual_seed(seed)
    return MusicBERT(ModelConfig(**{**TINY, **kw}), attention=attention)


LAYOUTS = pytest.mark.parametrize("attention", ["bars", "rows"])


def random_bars(n: int, seed: int = 0, lo: int = 5, hi: int = 60) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bars = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        body = torch.randint(5, len(VOCAB), (length - 2,), generator=g)
        bars.append(torch.cat([torch.tensor([VOCAB.bar_id]), body, torch.tensor([VOCAB.eob_id])]))
    return bars


def unpacked(bars: list[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One bar per row, <pad> after it."""
    L = length or max(len(b) for b in bars)
    tokens = torch.full((len(bars), L), VOCAB.pad_id, dtype=torch.long)
    segments = torch.zeros_like(tokens)
    for i, b in enumerate(bars):
        tokens[i, : len(b)] = b
        segments[i, : len(b)] = 1
    return tokens, segments


def packed(rows: list[list[torch.Tensor]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bars end to end in rows of ``length``, segments 1..k, <pad> after."""
    tokens = torch.full((len(rows), length), VOCAB.pad_id, dtype=torch.long)
    segments = torch.zeros_like(tokens)
    for r, row in enumerate(rows):
        c = 0
        for k, b in enumerate(row, start=1):
            tokens[r, c : c + len(b)] = b
            segments[r, c : c + len(b)] = k
            c += len(b)
        assert c <= length
    return tokens, segments


def per_bar_hidden(hidden: torch.Tensor, segments: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states of each bar, bars in row-major order of their first token."""
    out = []
    for r in range(segments.shape[0]):
        for k in range(1, int(segments[r].max()) + 1):
            out.append(hidden[r, segments[r] == k])
    return out


# --------------------------------------------------------------------------- invariances


@LAYOUTS
def test_padding_does_not_change_outputs(attention):
    model = tiny_model(attention=attention).eval()
    bars = random_bars(5, seed=1)
    with torch.no_grad():
        alone = [model(b[None]) for b in bars]  # no padding at all, no mask
        tokens, segments = unpacked(bars, length=100)  # lots of padding, other bars in the batch
        batch = model(tokens, segments)
        tokens2, _ = unpacked(bars, length=None)
        batch_implicit = model(tokens2)  # segments derived from <pad>
    for i, (b, out) in enumerate(zip(bars, alone)):
        n = len(b)
        torch.testing.assert_close(batch.hidden[i, :n], out.hidden[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(batch_implicit.hidden[i, :n], out.hidden[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(batch.bar_states[:, i], out.bar_states[:, 0], rtol=0, atol=1e-5)


@LAYOUTS
def test_packed_equals_unpacked(attention):
    model = tiny_model(attention=attention).eval()
    bars = random_bars(7, seed=2)
    rows = [bars[0:3], bars[3:5], bars[5:7]]
    with torch.no_grad():
        u_tok, u_seg = unpacked(bars, length=80)
        p_tok, p_seg = packed(rows, length=200)
        mask_u = (u_seg > 0) & (torch.rand(u_tok.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
        # The same masked positions in the packed layout.
        mask_p = torch.zeros_like(p_seg, dtype=torch.bool)
        for r, row in enumerate(rows):
            c = 0
            for b in row:
                i = next(j for j, x in enumerate(bars) if x is b)
                mask_p[r, c : c + len(b)] = mask_u[i, : len(b)]
                c += len(b)
        out_u = model(u_tok, u_seg, mask_u)
        out_p = model(p_tok, p_seg, mask_p)
    for hu, hp in zip(per_bar_hidden(out_u.hidden, u_seg), per_bar_hidden(out_p.hidden, p_seg)):
        torch.testing.assert_close(hp, hu, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_p.bar_states, out_u.bar_states, rtol=0, atol=1e-5)
    # MLM logits: same positions, both in row-major order, which is bar order here.
    torch.testing.assert_close(out_p.mlm_logits, out_u.mlm_logits, rtol=0, atol=1e-5)


def test_attention_layouts_agree_in_values_and_gradients():
    bars = random_bars(9, seed=8, lo=3, hi=70)  # many length classes, some bars of equal length
    bars.append(bars[0].clone())
    tokens, segments = packed([bars[0:4], bars[4:6], bars[6:10]], length=260)
    mlm_mask = (segments > 0) & (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) < 0.3)
    assert_layouts_agree(("bars", "rows"), tokens, segments, mlm_mask)


def assert_layouts_agree(layouts: tuple[str, str], tokens, segments, mlm_mask) -> None:
    """The same model (same seed) in two attention layouts: same hidden states of real tokens,
    bar states, MLM logits and parameter gradients of one loss."""
    outs, grads = [], []
    for attention in layouts:
        model = tiny_model(attention=attention, dropout=0.0).train()
        assert model.layout_for(tokens.device) == attention
        out = model(tokens, segments, mlm_mask)
        loss = torch.nn.functional.cross_entropy(out.mlm_logits, tokens[mlm_mask]) + out.bar_states[-1].square().mean()
        loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    real = segments > 0
    torch.testing.assert_close(outs[0].hidden[real], outs[1].hidden[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[0].bar_states, outs[1].bar_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[0].mlm_logits, outs[1].mlm_logits, rtol=0, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_attention_layout_is_refused():
    with pytest.raises(ValueError, match="attention"):
        tiny_model(attention="dense")


def math_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
    """What ``varlen_attn`` computes, in plain math (softmax(q k^T / sqrt(d)) v per sequence)."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k == int(cu_q.diff().max())
    assert q.shape == k.shape == v.shape and q.dim() == 3  # [T, H, hd]
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, hd]
        att = (qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)
        outs.append((att @ vs).transpose(0, 1))
    return torch.cat(outs)


def test_varlen_plan_cuts_bars_and_padding_runs():
    L = 2 * PAD_RUN + 40
    segments = torch.zeros(3, L, dtype=torch.long)
    segments[0, :10], segments[0, 10:25] = 1, 2  # then 2 * PAD_RUN + 15 padding tokens
    segments[1, :] = 1  # one bar filling the row
    segments[2, :5] = 1  # row 2: a 5-token bar, then padding
    plan = plan_varlen(segments)
    row0 = [0, 10, 25, 128, 256]  # padding cut where its column is a multiple of PAD_RUN
    expected = row0 + [L] + [2 * L, 2 * L + 5, 2 * L + 128, 2 * L + 256, 3 * L]
    assert plan.cu_seqlens.tolist() == expected and plan.cu_seqlens.dtype == torch.int32
    assert plan.max_len == L


def test_varlen_layout_wiring_matches_rows(monkeypatch):
    """The varlen layout's plumbing (q/k/v layout, rotary, cu_seqlens, output order) with the
    flash kernel replaced by its math definition, on CPU; the kernel itself is checked on a GPU
    by bench/gpu.py."""
    monkeypatch.setattr(attention_mod, "varlen_attn", math_varlen_attn)
    monkeypatch.setattr(model_mod, "varlen_usable", lambda device, dtype: True)
    bars = random_bars(7, seed=5, lo=3, hi=70)
    tokens, segments = packed([bars[0:3], bars[3:5], bars[5:7]], length=200)
    mlm_mask = (segments > 0) & (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
    assert_layouts_agree(("varlen", "rows"), tokens, segments, mlm_mask)


@pytest.mark.parametrize(
    ("capability", "dtype", "usable"),
    [((9, 0), torch.bfloat16, True), ((8, 0), torch.float16, True), ((9, 0), torch.float32, False), ((7, 5), torch.float16, False)],
)
def test_varlen_runs_on_sm80_and_newer_in_half_precision(monkeypatch, capability, dtype, usable):
    """The flash kernel's conditions, with a pretend GPU (H200/H100: sm90, A100: sm80, T4: sm75)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    assert varlen_usable(torch.device("cuda", 0), dtype) is usable
    assert varlen_usable(torch.device("cpu"), dtype) is False


def test_auto_layout_is_bars_on_cpu_and_varlen_is_refused_there():
    tokens = torch.stack(random_bars(1, seed=3, lo=20, hi=21))
    auto = tiny_model(attention="auto")
    assert auto.layout_for(tokens.device) == "bars"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto.layout_for(tokens.device) == "bars"
    with pytest.raises(RuntimeError, match="varlen.*CUDA"):
        tiny_model(attention="varlen")(tokens)


def test_segment_positions_restart_per_bar():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0, 0]])
    positions, starts = segment_positions(segments)
    real = segments > 0
    assert positions[real].tolist() == [0, 1, 2, 0, 1] + list(range(7)) + [0, 0, 0, 1]
    assert starts.tolist() == [0, 3, 7, 14, 15, 16]


# --------------------------------------------------------------------------- outputs


def test_mlm_logits_only_at_masked_positions_and_bar_states_order():
    model = tiny_model().eval()
    bars = random_bars(6, seed=3)
    tokens, segments = packed([bars[:2], bars[2:5], bars[5:]], length=180)
    mlm_mask = (segments > 0) & (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.15)
    batch = Batch(tokens=tokens, segments=segments, mlm_mask=mlm_mask, mlm_targets=tokens[mlm_mask],
                  pair_anchor=torch.zeros(0, dtype=torch.long), pair_positive=torch.zeros(0, dtype=torch.long))
    with torch.no_grad():
        out = model.forward_batch(batch)
        no_mask = model(tokens, segments)
    M = int(mlm_mask.sum())
    assert out.mlm_logits.shape == (M, len(VOCAB))
    assert no_mask.mlm_logits is None
    torch.testing.assert_close(out.mlm_logits, model.mlm_head(out.hidden[mlm_mask]))
    # bar_states: [n_layers, n_bars, dim], bars in Batch.bar_starts order, last layer = hidden at Bar_0.
    assert out.bar_states.shape == (TINY["n_layers"], batch.n_bars, TINY["dim"])
    starts = batch.bar_starts()
    assert (tokens[starts[:, 0], starts[:, 1]] == VOCAB.bar_id).all()
    torch.testing.assert_close(out.bar_states[-1], out.hidden[starts[:, 0], starts[:, 1]])
    # Earlier layers: compare with a model truncated to the first layer.
    truncated = tiny_model()
    truncated.load_state_dict(model.state_dict())
    truncated.blocks = truncated.blocks[:1]
    with torch.no_grad():
        first = truncated.eval()(tokens, segments)
    torch.testing.assert_close(out.bar_states[0], first.bar_states[-1])


def test_bar_longer_than_max_len_is_refused():
    model = tiny_model(max_len=16).eval()
    tokens = torch.randint(5, 100, (1, 40))
    segments = torch.ones_like(tokens)
    segments[0, 20:] = 2  # bars of 20 tokens > 16
    with pytest.raises(ValueError, match="max_len"):
        model(tokens, segments)


# --------------------------------------------------------------------------- structure


def test_positional_table_is_a_buffer_in_state_dict():
    model = tiny_model()
    state = model.state_dict()
    assert "pos_table" in state and state["pos_table"].shape == (TINY["max_len"], TINY["dim"])
    assert "pos_table" in dict(model.named_buffers())
    assert "pos_table" not in dict(model.named_parameters())
    # Restored from a checkpoint, not recomputed: a changed table survives a round trip.
    other = tiny_model(seed=1)
    state["pos_table"] = state["pos_table"] + 1.0
    other.load_state_dict(state)
    torch.testing.assert_close(other.pos_table, state["pos_table"])


def test_no_layernorm_shared_between_blocks():
    model = tiny_model(n_layers=3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    # embedding LN + 3 per block (attention post-norm, feed-forward input norm, feed-forward post-norm) + MLM head LN
    assert len(norms) == 1 + 3 * 3 + 1
    assert len({id(m) for m in norms}) == len(norms)
    ptrs = [m.weight.data_ptr() for m in norms]
    assert len(set(ptrs)) == len(ptrs)
    for a, b in zip(model.blocks[:-1], model.blocks[1:]):
        assert a.attn_norm is not b.attn_norm and a.ff_norm is not b.ff_norm and a.ff.norm is not b.ff.norm


def test_attention_projections_have_no_bias():
    model = tiny_model()
    for block in model.blocks:
        assert block.attn.qkv.bias is None and block.attn.out.bias is None


def test_rotary_acts_on_exactly_rotary_dims():
    rd, head_dim = TINY["rotary_dims"], TINY["dim"] // TINY["n_heads"]
    positions = torch.arange(10)
    cos, sin = rotary_cos_sin(positions, rd)
    assert cos.shape == (10, rd // 2)
    x = torch.randn(1, 2, 10, head_dim)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., rd:], x[..., rd:])  # the other dims pass through
    assert torch.equal(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated
    assert (y[:, :, 1:, :rd] - x[:, :, 1:, :rd]).abs().amax(dim=-1).min() > 0  # every other position is
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # Relative: q.k after rotation depends only on the offset.
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    def dot(i, j):
        qq = apply_rotary(q.expand(1, 1, 10, head_dim), cos, sin)[0, 0, i]
        kk = apply_rotary(k.expand(1, 1, 10, head_dim), cos, sin)[0, 0, j]
        return float(qq @ kk)
    assert dot(3, 1) == pytest.approx(dot(7, 5), abs=1e-5)
    # The custom backward is the exact gradient.
    xd = torch.randn(2, 10, 3, head_dim, dtype=torch.float64, requires_grad=True)
    cd, sd = (t.double()[None, :, None, :] for t in (cos, sin))
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cd, sd), (xd,))
    # The model's heads use exactly cfg.rotary_dims.
    model = tiny_model()
    assert all(b.attn.rotary_dims == rd for b in model.blocks)


def test_rotary_changes_outputs_in_the_model():
    """With the sinusoidal table zeroed, positions still matter through rotary alone."""
    model = tiny_model().eval()
    model.pos_table.zero_()
    bar = random_bars(1, seed=4, lo=30, hi=31)[0]
    shuffled = torch.cat([bar[:1], bar[1:-1].flip(0), bar[-1:]])
    with torch.no_grad():
        a = model(bar[None]).bar_states
        b = model(shuffled[None]).bar_states
        no_rot = tiny_model(rotary_dims=0).eval()
        no_rot.load_state_dict(model.state_dict())
        c = no_rot(bar[None]).bar_states
        d = no_rot(shuffled[None]).bar_states
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(c, d, rtol=0, atol=1e-5)  # no position information left at all


# --------------------------------------------------------------------------- training


def test_gradients_flow_to_every_parameter():
    model = tiny_model().train()
    bars = random_bars(4, seed=5, lo=20, hi=40)
    tokens, segments = packed([bars[:2], bars[2:]], length=90)
    mlm_mask = (segments > 0) & (tokens != VOCAB.bar_id) & (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(2)) < 0.3)
    out = model(tokens, segments, mlm_mask)
    mlm = torch.nn.functional.cross_entropy(out.mlm_logits, tokens[mlm_mask])
    nce, _ = nt_xent(out.bar_states[-1][[0, 1]], out.bar_states[-1][[2, 3]], 0.1)
    (mlm + 0.1 * nce).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.pos_table.grad is None
    # Only the last layer's bar states carry gradient in training (documented).
    out = model(tokens, segments, mlm_mask)
    params = list(model.parameters())
    first = torch.autograd.grad(out.bar_states[0].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in first)
    last = torch.autograd.grad(out.bar_states[-1].sum(), params, allow_unused=True)
    assert sum(g is not None for g in last) > len(params) // 2


@LAYOUTS
def test_bert_dropout_views_differ_in_train_mode_only(attention):
    model = tiny_model(dropout=0.1, attention=attention)
    bar = random_bars(1, seed=6, lo=40, hi=41)[0]
    tokens, segments = packed([[bar, bar], [bar]], length=100)  # the same masked bar three times
    model.train()
    states = model(tokens, segments).bar_states[-1]
    assert (states[0] - states[1]).abs().max() > 1e-3
    assert (states[0] - states[2]).abs().max() > 1e-3
    model.eval()
    with torch.no_grad():
        states = model(tokens, segments).bar_states[-1]
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(states[0], states[2], rtol=0, atol=1e-5)


def test_bert_dropout_with_zero_dropout_is_refused():
    with pytest.raises(ConfigError, match="dropout"):
        config_from_dict({"objective": {"mode": "BERT-dropout"}, "model": {"dropout": 0.0}})
    cfg = config_from_dict({"objective": {"mode": "BERT-dropout"}, "model": {"dropout": 0.1}})
    assert cfg.model.dropout == 0.1


@LAYOUTS
def test_no_nan_with_all_padding_rows_and_empty_mask(attention):
    model = tiny_model(attention=attention).eval()
    bars = random_bars(2, seed=7)
    tokens, segments = packed([bars, []], length=150)
    with torch.no_grad():
        out = model(tokens, segments, torch.zeros_like(tokens, dtype=torch.bool))
        empty = model(torch.zeros_like(tokens), torch.zeros_like(segments))  # an all-padding batch
    assert torch.isfinite(out.hidden).all()
    assert out.mlm_logits.shape == (0, len(VOCAB))
    assert out.bar_states.shape[1] == 2
    assert torch.isfinite(empty.hidden).all() and empty.bar_states.shape == (TINY["n_layers"], 0, TINY["dim"])


def test_training_flops_counts_every_matmul_of_a_step():
    """The MFU numerator equals PyTorch's FLOP count of one forward + backward (math attention,
    one full bar per row, so no padding and no grouping: every counted FLOP is useful)."""
    model = tiny_model(dropout=0.0, attention="rows")
    R, L = 3, 100
    tokens = torch.randint(5, len(VOCAB), (R, L), generator=torch.Generator().manual_seed(0))
    mlm_mask = torch.rand(R, L, generator=torch.Generator().manual_seed(1)) < 0.2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, None, mlm_mask).mlm_logits.sum().backward()
    assert training_flops(model.cfg, R * L, R * L * L, int(mlm_mask.sum())) == counter.get_total_flops()
