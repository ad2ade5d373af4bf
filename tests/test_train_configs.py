"""configs/*.yaml load, and base.yaml holds the reference hyper-parameters of SPEC §4-5."""

from __future__ import annotations

from pathlib import Path

import pytest

from musicbert.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_base_is_the_reference():
    c = load_config(CONFIGS / "base.yaml")
    assert (c.model.dim, c.model.n_layers, c.model.n_heads, c.model.ff_dim, c.model.max_len, c.model.rotary_dims) == (768, 12, 12, 3072, 512, 32)
    assert (c.train.lr, c.train.warmup_steps, c.train.precision) == (1e-4, 10_000, "auto")
    assert (c.objective.temperature, c.objective.mlm_weight, c.objective.nce_weight, c.objective.mask_ratio) == (0.1, 1.0, 0.1, 0.15)


@pytest.mark.parametrize(
    "name, mode", [("bert", "BERT"), ("aug", "BERT-aug"), ("neighbor", "BERT-neighbor"), ("dropout", "BERT-dropout"), ("demo", "BERT-neighbor")]
)
def test_mode_configs(name, mode):
    c = load_config(CONFIGS / f"{name}.yaml")
    assert c.objective.mode == mode
    if mode == "BERT-dropout":
        assert c.model.dropout == 0.1
    if name != "demo":  # everything else is the reference's
        base = load_config(CONFIGS / "base.yaml").to_dict()
        mine = c.to_dict()
        for section in ("train", "data"):
            assert mine[section] == base[section]
