"""Run configuration: dataclasses loaded from YAML, with ``base:`` inheritance and dotted overrides.

``load_config("configs/neighbor.yaml", ["train.max_steps=100", "run_dir=runs/x"])``
reads the file (and the file its ``base:`` key names, relative to it), applies the
overrides, and validates everything: an unknown key is an error that lists the valid
ones, a value of the wrong type names the key, and inconsistent settings (for example
``BERT-dropout`` with dropout 0) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("BERT", "BERT-aug", "BERT-neighbor", "BERT-dropout")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


@dataclass
class ModelConfig:
    vocab_size: int = 560
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ff_dim: int = 3072
    max_len: int = 512
    dropout: float = 0.1
    rotary_dims: int = 32  # rotary embedding on this many dims of each head's queries and keys

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        head_dim = self.dim // self.n_heads
        if self.rotary_dims % 2 or not 0 <= self.rotary_dims <= head_dim:
            raise ConfigError(f"model.rotary_dims ({self.rotary_dims}) must be even and at most dim/n_heads ({head_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout ({self.dropout}) must be in [0, 1)")


@dataclass
class ObjectiveConfig:
    mode: str = "BERT-neighbor"
    mask_ratio: float = 0.15
    temperature: float = 0.1
    mlm_weight: float = 1.0
    nce_weight: float = 0.1
    aug_pitch_shift: int = 6  # BERT-aug: pitches shift by k in [-6, 6]
    aug_velocity_shift: int = 3  # BERT-aug: velocity bins shift by j in [-3, 3]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"objective.mode {self.mode!r} is not one of {list(MODES)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio ({self.mask_ratio}) must be in (0, 1)")
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature ({self.temperature}) must be > 0")


@dataclass
class DataConfig:
    shards: str = "shards/lmd"  # a folder written by `python -m preprocess`
    max_tokens: int = 12288  # real tokens per rank per step (the reference: 24 bars of up to 512)
    row_len: int = 1024  # length of a packed row; at least model.max_len
    shuffle_buffer: int = 256  # songs
    workers: int = 4  # DataLoader workers per rank
    seed: int = 0

    def validate(self) -> None:
        if self.row_len < 1 or self.max_tokens < self.row_len:
            raise ConfigError(f"data.max_tokens ({self.max_tokens}) must be at least data.row_len ({self.row_len})")
        if self.workers < 0:
            raise ConfigError(f"data.workers ({self.workers}) must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    lr: float = 1e-4
    warmup_steps: int = 10_000
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    accum_steps: int = 1
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 with GradScaler on GPU, fp32 on CPU
    log_every: int = 50
    val_every: int = 2000
    val_batches: int = 50
    ckpt_every: int = 2000
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    seed: int = 0

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.keep_checkpoints < 2:
            raise ConfigError(f"train.keep_checkpoints ({self.keep_checkpoints}) must be >= 2 so a corrupt newest one has a fallback")
        for key in ("max_steps", "warmup_steps", "accum_steps", "log_every", "val_every", "ckpt_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} ({getattr(self, key)}) must be >= 1")


@dataclass
class ProbeConfig:
    """Probes run by the training loop on a small sample (0 = never)."""

    every: int = 0
    layers: str = "all"
    max_songs: int = 200
    projector_bars: int = 500  # bar embeddings written for TensorBoard's projector at each probe

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"probe.every ({self.every}) must be >= 0")


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        for section in (self.model, self.objective, self.data, self.train, self.probe):
            section.validate()
        if self.objective.mode == "BERT-dropout" and self.model.dropout == 0:
            raise ConfigError(
                "objective.mode BERT-dropout needs model.dropout > 0: with dropout 0 its two views are identical"
            )
        if self.data.row_len < self.model.max_len:
            raise ConfigError(f"data.row_len ({self.data.row_len}) must be >= model.max_len ({self.model.max_len})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting only int -> float and lists -> tuples."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads exponents without a dot (``1e-4``) as strings.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is type(None) and value is None:
        return None
    if isinstance(annotation, type) and isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / base, (*seen, path)), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings; values are parsed as YAML (``3``, ``1e-4``, ``[0.9, 0.98]``, ``BERT``)."""
    data = _merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def read_config_file(path: str | Path, overrides: list[str] = ()) -> dict:
    """The mapping of a YAML file (its ``base:`` chain merged in) with ``overrides`` applied, unvalidated."""
    return apply_overrides(_read_yaml(Path(path)), list(overrides))


def build_section(cls: type, data: dict, prefix: str = "") -> Any:
    """Any config dataclass from a mapping, with :class:`Config`'s checks (unknown keys, types),
    then its own ``validate()``: for files other than training configs (e.g. a study's)."""
    section = _build(cls, data, prefix)
    section.validate()
    return section


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``overrides``, validate."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, list(overrides)))
