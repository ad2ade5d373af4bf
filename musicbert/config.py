"""Run configuration: dataclasses loaded from YAML, with ``base:`` inheritance and dotted overrides.

``load_config("configs/neighbor.yaml", ["train.max_steps=100", "run_dir=runs/x"])``
reads the file (and the file its ``base:`` key names, relative to it), applies the
overrides, and validates everything: an unknown key is an error that lists the valid
ones, a value of the wrong type names the key, every number is checked against the range
declared beside its field (``in_range``; NaN and infinity are refused everywhere), and
inconsistent settings (for example ``BERT-dropout`` with dropout 0) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("BERT", "BERT-aug", "BERT-neighbor", "BERT-dropout")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTION_LAYOUTS = ("auto", "varlen", "bars", "rows")  # MusicBERT(attention=...), musicbert/attention.py


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``low <(=) value <(=) high`` (None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: float, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} ({value}) must be a finite number")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ConfigError(f"{key} ({value}) must be {self}")

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)


def in_range(default: Any, allowed: Range) -> Any:
    """A dataclass field whose value (each element, for tuples) must lie in ``allowed``."""
    return field(default=default, metadata={"range": allowed})


def check_ranges(section: Any, prefix: str) -> None:
    """Check every field of ``section`` declared with :func:`in_range`, and that no float is NaN/inf."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}.{f.name}"
        allowed = f.metadata.get("range", Range())
        for i, item in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                allowed.check(item, key if i is None else f"{key}[{i}]")


@dataclass
class ModelConfig:
    vocab_size: int = in_range(560, AT_LEAST_1)
    dim: int = in_range(768, AT_LEAST_1)
    n_layers: int = in_range(12, AT_LEAST_1)
    n_heads: int = in_range(12, AT_LEAST_1)
    ff_dim: int = in_range(3072, AT_LEAST_1)
    max_len: int = in_range(512, AT_LEAST_1)
    dropout: float = in_range(0.1, FRACTION)
    rotary_dims: int = in_range(32, NON_NEGATIVE)  # rotary embedding on this many dims of each head's queries and keys

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        head_dim = self.dim // self.n_heads
        if self.rotary_dims % 2 or self.rotary_dims > head_dim:
            raise ConfigError(f"model.rotary_dims ({self.rotary_dims}) must be even and at most dim/n_heads ({head_dim})")


@dataclass
class ObjectiveConfig:
    mode: str = "BERT-neighbor"
    mask_ratio: float = in_range(0.15, Range(0, 1, low_open=True, high_open=True))
    temperature: float = in_range(0.1, POSITIVE)
    mlm_weight: float = in_range(1.0, NON_NEGATIVE)
    nce_weight: float = in_range(0.1, NON_NEGATIVE)
    aug_pitch_shift: int = in_range(6, Range(0, 127))  # BERT-aug: pitches shift by k in [-6, 6]
    aug_velocity_shift: int = in_range(3, Range(0, 31))  # BERT-aug: velocity bins shift by j in [-3, 3]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"objective.mode {self.mode!r} is not one of {list(MODES)}")
        if self.mlm_weight == 0 and (self.nce_weight == 0 or self.mode == "BERT"):
            raise ConfigError("objective.mlm_weight is 0 and there is no contrastive loss (nce_weight 0 or mode BERT): nothing to train")


@dataclass
class DataConfig:
    shards: str = "shards/lmd"  # a folder written by `python -m preprocess`
    max_tokens: int = in_range(12288, AT_LEAST_1)  # real tokens per rank per step (the reference: 24 bars of up to 512)
    row_len: int = in_range(1024, AT_LEAST_1)  # length of a packed row; at least model.max_len
    shuffle_buffer: int = in_range(256, AT_LEAST_1)  # songs
    workers: int = in_range(4, NON_NEGATIVE)  # DataLoader workers per rank
    seed: int = in_range(0, NON_NEGATIVE)

    def validate(self) -> None:
        if self.max_tokens < self.row_len:
            raise ConfigError(f"data.max_tokens ({self.max_tokens}) must be at least data.row_len ({self.row_len})")


@dataclass
class TrainConfig:
    max_steps: int = in_range(100_000, AT_LEAST_1)
    lr: float = in_range(1e-4, POSITIVE)
    warmup_steps: int = in_range(10_000, AT_LEAST_1)
    weight_decay: float = in_range(0.01, NON_NEGATIVE)
    betas: tuple[float, float] = in_range((0.9, 0.999), FRACTION)
    grad_clip: float = in_range(1.0, POSITIVE)
    accum_steps: int = in_range(1, AT_LEAST_1)
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 with GradScaler on GPU, fp32 on CPU
    # How attention is computed (same numbers to rounding; see musicbert/attention.py): auto = varlen
    # (flash attention over the packed bars) on GPUs that run it in bf16/fp16, else bars.
    attention: str = "auto"
    log_every: int = in_range(50, AT_LEAST_1)
    val_every: int = in_range(2000, AT_LEAST_1)
    val_batches: int = in_range(50, AT_LEAST_1)
    ckpt_every: int = in_range(2000, AT_LEAST_1)
    keep_checkpoints: int = in_range(3, Range(2))  # >= 2 so that a corrupt newest one has a fallback
    max_bad_steps: int = in_range(20, AT_LEAST_1)  # consecutive non-finite losses before the run stops
    seed: int = in_range(0, NON_NEGATIVE)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.attention not in ATTENTION_LAYOUTS:
            raise ConfigError(f"train.attention {self.attention!r} is not one of {list(ATTENTION_LAYOUTS)}")


@dataclass
class ProbeConfig:
    """Probes run by the training loop on a small sample (0 = never)."""

    every: int = in_range(0, NON_NEGATIVE)
    layers: str = "all"
    max_songs: int = in_range(200, AT_LEAST_1)
    projector_bars: int = in_range(500, NON_NEGATIVE)  # bar embeddings written for TensorBoard's projector at each probe


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        for name in ("model", "objective", "data", "train", "probe"):
            check_ranges(getattr(self, name), name)  # first: the sections' own checks divide by these
        for section in (self.model, self.objective, self.data, self.train):
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
