"""Rendering evaluation results: ``metrics.json`` <-> table, figure and side-by-side comparison.

``metrics.json`` (written by :mod:`musicbert.evaluate`)::

    {"layers": {"1": {"chords": {"mean": 0.71, "std": 0.004, "values": [...]}, ...}, ...},
     "better": {"chords": "higher", ..., "song_clustering": "lower"},
     "settings": {...}}

A value that is undefined on the sample is ``null``. Annotated-label metrics (``--labels``)
follow the seven in each layer, with their direction in ``better`` and what they are under
``"labels"``; every function here takes the metric list and directions from the file. Compare two files (e.g. a trained model
and its random-init baseline) with::

    python -m musicbert.report A/metrics.json B/metrics.json [--names trained random-init]
    python -m musicbert.evaluate --compare A/metrics.json B/metrics.json   (the same)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from musicbert.probes.metrics import HIGHER_IS_BETTER, METRIC_KIND, METRIC_TABLE, METRICS


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x, digits: int = 3) -> str:
    x = _num(x)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def higher_is_better(metric: str, metrics: dict | None = None) -> bool:
    """The metric's direction: from the file's ``better`` (annotated labels), else the seven's."""
    better = (metrics or {}).get("better", {})
    return better[metric] == "higher" if metric in better else HIGHER_IS_BETTER[metric]


def arrow(metric: str, metrics: dict | None = None) -> str:
    return "↑" if higher_is_better(metric, metrics) else "↓"


def layer_numbers(metrics: dict) -> list[int]:
    return sorted(int(k) for k in metrics["layers"])


def label_metrics(metrics: dict) -> list[str]:
    """The annotated-label metrics of a file (``--labels``), in their order."""
    return list(metrics.get("labels", {}))


def metric_names(metrics: dict) -> list[str]:
    """The seven metrics, then the file's annotated-label metrics."""
    return [*METRICS, *label_metrics(metrics)]


def metric_kind(metric: str, metrics: dict) -> str:
    labels = metrics.get("labels", {})
    return labels[metric]["metric"] if metric in labels else METRIC_KIND[metric]


def markdown_table(metrics: dict) -> str:
    """Layers as rows, metrics as columns (``mean ± std``); the best layer of each metric in bold."""
    layers = layer_numbers(metrics)
    names = metric_names(metrics)
    best = {m: best_layer(metrics, m)[0] for m in names}
    head = "| layer | " + " | ".join(f"{m} {arrow(m, metrics)}" for m in names) + " |"
    sep = "|---:|" + "---:|" * len(names)
    lines = [head, sep]
    for layer in layers:
        cells = []
        for m in names:
            cell = metrics["layers"][str(layer)][m]
            text = _fmt(cell["mean"]) + ("" if cell.get("std") is None else f" ± {_fmt(cell['std'])}")
            cells.append(f"**{text}**" if best[m] == layer else text)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(metrics: dict, title: str = "Probing results") -> str:
    s = metrics.get("settings", {})
    kinds = ", ".join(f"{m}: {metric_kind(m, metrics)}" for m in metric_names(metrics))
    lines = [
        f"# {title}",
        "",
        f"- model: {'random-init (untrained) model of ' if s.get('random_init') else ''}`{s.get('checkpoint', '?')}` (step {s.get('step', '?')})",
        f"- protocol: {s.get('protocol', '?')}; repeats: {s.get('repeats', '?')}; seed: {s.get('seed', '?')}",
        f"- probe training set: {s.get('train_songs', '?')} songs of split {s.get('train_split', '?')!s}, "
        f"{s.get('train_bars', '?')} bars per repeat; test set: {s.get('test_songs', '?')} songs of split "
        f"{s.get('test_split', '?')!s}, {s.get('test_bars', '?')} bars per repeat",
        f"- k-means clusters used: {s.get('clusters_used', '?')} (asked for {s.get('clusters', '?')})",
        f"- metrics ({kinds}); ↑ higher is better, ↓ lower is better; best layer in bold; mean ± std over repeats",
        "",
        markdown_table(metrics),
        "",
    ]
    lines += label_report(metrics)
    notes = s.get("notes") or []
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes[:20]] + ([f"- ... and {len(notes) - 20} more"] if len(notes) > 20 else []) + [""]
    return "\n".join(lines)


def label_report(metrics: dict) -> list[str]:
    """Lines on the annotated labels: what each file is and how much of it matched the shards."""
    labels = metrics.get("labels", {})
    if not labels:
        return []
    lines = ["Annotated labels (`--labels`):", ""]
    for name, s in labels.items():
        outside = s["bars_before_song"] + s["bars_after_song"]
        lines.append(
            f"- {name}: `{s['file']}`, {s['kind']} ({s['metric']}), {s['level']} level, {s['classes']} classes; "
            f"{s['matched']} of {s['labelled']} labelled songs/bars matched; {s['unknown_paths']} unknown path(s)"
            f"{' (e.g. ' + ', '.join(s['unknown_path_examples']) + ')' if s['unknown_paths'] else ''}, "
            f"{outside} bar(s) outside their song, {s['bars_not_kept']} on bars not kept"
        )
    return lines + [""]


def plot_layers(metrics: dict, path: str | Path, title: str | None = None) -> None:
    """Each metric against layer (mean, std as error bars), like the paper's figure:
    left the [0, 1] metrics (AUCs, accuracy, entropy), then the two RMSEs (different units),
    then, when there are any, the annotated-label metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = layer_numbers(metrics)
    groups = (
        ("AUC / accuracy / entropy", tuple(m.name for m in METRIC_TABLE if m.kind != "RMSE")),
        *((f"RMSE ({m.unit})", (m.name,)) for m in METRIC_TABLE if m.kind == "RMSE"),
    )
    if label_metrics(metrics):
        groups += (("annotated labels: " + ", ".join(sorted({metric_kind(m, metrics) for m in label_metrics(metrics)})),
                    tuple(label_metrics(metrics))),)
    ratios = [2, 1, 1, 2][: len(groups)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * sum(ratios), 4.2), gridspec_kw={"width_ratios": ratios})
    names_all = metric_names(metrics)
    for ax, (ylabel, names) in zip(axes, groups):
        for m in names:
            mean = [_num(metrics["layers"][str(l)][m]["mean"]) for l in layers]
            std = [_num(metrics["layers"][str(l)][m].get("std")) for l in layers]
            std = [0.0 if math.isnan(s) else s for s in std]
            ax.errorbar(layers, mean, yerr=std, marker="o", capsize=3, color=f"C{names_all.index(m)}", label=f"{m} {arrow(m, metrics)}")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_xticks(layers)
        ax.grid(True, alpha=0.4)
        ax.legend(fontsize=8)
    if title is None:
        s = metrics.get("settings", {})
        title = f"{'random-init ' if s.get('random_init') else ''}step {s.get('step', '?')}, protocol {s.get('protocol', '?')}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_layer(metrics: dict, metric: str) -> tuple[int | None, float]:
    """``(layer, mean)`` of the best layer for ``metric`` (ignoring undefined values)."""
    best_l, best_v = None, float("nan")
    for layer in layer_numbers(metrics):
        v = _num(metrics["layers"][str(layer)][metric]["mean"])
        if math.isnan(v):
            continue
        if best_l is None or (v > best_v if higher_is_better(metric, metrics) else v < best_v):
            best_l, best_v = layer, v
    return best_l, best_v


def default_name(metrics: dict, fallback: str) -> str:
    s = metrics.get("settings", {})
    if s.get("random_init"):
        return "random-init"
    return f"step {s['step']}" if "step" in s else fallback


def _winner(a: float, b: float, higher: bool, names: tuple[str, str]) -> str:
    if math.isnan(a) or math.isnan(b):
        return "n/a"
    if a == b:
        return "tie"
    a_better = a > b if higher else a < b
    return names[0] if a_better else names[1]


def compare(a: dict, b: dict, names: tuple[str, str] | None = None) -> str:
    """A markdown table of two results side by side: best layer and last layer per metric
    (the seven, then the annotated-label metrics both files have)."""
    names = names or (default_name(a, "A"), default_name(b, "B"))
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")
    last_a, last_b = layer_numbers(a)[-1], layer_numbers(b)[-1]
    lines = [
        f"| metric | better | {names[0]}: best (layer) | {names[1]}: best (layer) | winner | "
        f"{names[0]}: layer {last_a} | {names[1]}: layer {last_b} | winner (last) |",
        "|---|:---:|---:|---:|---|---:|---:|---|",
    ]
    for m in [*METRICS, *(x for x in label_metrics(a) if x in label_metrics(b))]:
        la, va = best_layer(a, m)
        lb, vb = best_layer(b, m)
        xa = _num(a["layers"][str(last_a)][m]["mean"])
        xb = _num(b["layers"][str(last_b)][m]["mean"])
        higher = higher_is_better(m, a)
        better = "higher ↑" if higher else "lower ↓"
        lines.append(
            f"| {m} | {better} | {_fmt(va)} ({la}) | {_fmt(vb)} ({lb}) | {_winner(va, vb, higher, names)} | "
            f"{_fmt(xa)} | {_fmt(xb)} | {_winner(xa, xb, higher, names)} |"
        )
    return "\n".join(lines)


def read_metrics(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file (give a metrics.json written by python -m musicbert.evaluate)") from None
    except ValueError as exc:
        raise SystemExit(f"{path}: not valid JSON: {exc}") from None
    if "layers" not in data:
        raise SystemExit(f"{path}: not a metrics.json of python -m musicbert.evaluate (no 'layers')")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musicbert.report", description="Print two metrics.json side by side.")
    p.add_argument("a", help="metrics.json (or the folder holding it), e.g. the trained model's")
    p.add_argument("b", help="metrics.json to compare with, e.g. the random-init model's")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="column names (default: from the files' settings)")
    args = p.parse_args(argv)
    print(compare(read_metrics(args.a), read_metrics(args.b), tuple(args.names) if args.names else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
