"""What the probes measure: the metric table, the scoring protocols, :class:`ProbeError`.

:data:`METRIC_TABLE` is the one declaration of the seven metrics (name as in
``metrics.json``, direction, what the number is); the evaluation, the report and the
annotated labels read their lists and directions from it. Definitions: :mod:`musicbert.probes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from musicbert.inference import InferenceError


class ProbeError(InferenceError):
    """The probes cannot run as asked (empty split, bad protocol); the message says why."""


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    kind: str  # what the number is: "weighted ROC-AUC", "accuracy", "RMSE", "normalised entropy"
    unit: str = ""  # the unit of an RMSE


METRIC_TABLE: tuple[Metric, ...] = (
    Metric("chords", True, "weighted ROC-AUC"),
    Metric("groove", True, "weighted ROC-AUC"),
    Metric("instruments", True, "weighted ROC-AUC"),
    Metric("tempo", True, "accuracy"),
    Metric("mean_velocity", False, "RMSE", "MIDI velocity"),
    Metric("mean_duration", False, "RMSE", "duration bins"),
    Metric("song_clustering", False, "normalised entropy"),
)
# Views of the table, by name.
METRICS: tuple[str, ...] = tuple(m.name for m in METRIC_TABLE)
HIGHER_IS_BETTER: dict[str, bool] = {m.name: m.higher_is_better for m in METRIC_TABLE}
METRIC_KIND: dict[str, str] = {m.name: m.kind for m in METRIC_TABLE}

PROTOCOLS = ("standard", "reference")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ProbeError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
