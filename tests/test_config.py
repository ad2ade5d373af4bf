from pathlib import Path

import pytest

from musicbert.config import ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_reference_hyper_parameters():
    cfg = load_config(None)
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.ff_dim) == (768, 12, 12, 3072)
    assert (cfg.train.lr, cfg.train.warmup_steps) == (1e-4, 10_000)
    assert (cfg.objective.temperature, cfg.objective.mlm_weight, cfg.objective.nce_weight) == (0.1, 1.0, 0.1)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model: {dim: 64, n_heads: 4, rotary_dims: 8}\ntrain: {lr: 0.001}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmodel: {n_layers: 2}\n")
    cfg = load_config(child, ["train.max_steps=7", "train.betas=[0.9, 0.98]", "run_dir=runs/x"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (64, 4, 2)
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 7 and cfg.train.betas == (0.9, 0.98)
    assert cfg.run_dir == "runs/x"


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; float fields accept it, in files and overrides.
    path = write(tmp_path / "c.yaml", "train: {lr: 1e-4}\n")
    assert load_config(path).train.lr == 1e-4
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key train\.max_stepz; valid keys of train: max_steps"):
        load_config(None, ["train.max_stepz=3"])


def test_unknown_key_in_file_is_refused(tmp_path):
    path = write(tmp_path / "c.yaml", "modle: {dim: 3}\n")
    with pytest.raises(ConfigError, match="unknown key modle; valid keys: run_dir, model"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.lr=fast"], r"train\.lr: expected float"),
        (["train.max_steps=true"], r"train\.max_steps: expected int"),
        (["objective.mode=BERT-dropout", "model.dropout=0"], "needs model.dropout > 0"),
        (["objective.mode=SimCLR"], "is not one of"),
        (["model.dim=100", "model.n_heads=12"], "divisible"),
        (["train.keep_checkpoints=1"], "keep_checkpoints"),
        (["train.attention=dense"], r"train\.attention 'dense' is not one of"),
        (["train.max_steps"], "key=value"),
        (["train.lr=-1"], r"train\.lr \(-1\.0\) must be > 0"),
        (["train.lr=.nan"], r"train\.lr \(nan\) must be a finite number"),
        (["train.weight_decay=.inf"], r"train\.weight_decay \(inf\) must be a finite number"),
        (["train.betas=[0.9, 1.0]"], r"train\.betas\[1\] \(1\.0\) must be in \[0, 1\)"),
        (["train.grad_clip=0"], r"train\.grad_clip \(0\.0\) must be > 0"),
        (["train.warmup_steps=0"], r"train\.warmup_steps \(0\) must be >= 1"),
        (["objective.temperature=0"], r"objective\.temperature \(0\.0\) must be > 0"),
        (["objective.nce_weight=-0.1"], r"objective\.nce_weight \(-0\.1\) must be >= 0"),
        (["objective.mask_ratio=1"], r"objective\.mask_ratio \(1\.0\) must be in \(0, 1\)"),
        (["objective.mode=BERT", "objective.mlm_weight=0"], "nothing to train"),
        (["model.n_heads=0"], r"model\.n_heads \(0\) must be >= 1"),
        (["model.dropout=1.5"], r"model\.dropout \(1\.5\) must be in \[0, 1\)"),
        (["data.max_tokens=-5"], r"data\.max_tokens \(-5\) must be >= 1"),
        (["probe.max_songs=0"], r"probe\.max_songs \(0\) must be >= 1"),
    ],
)
def test_bad_values_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    loop = write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)
