"""A study's comparison: several models' metrics.json -> results.json, table.md, figure.png.

Generic over the metrics: whatever names the ``metrics.json`` files hold under ``"layers"``,
with their direction from ``"better"`` (``"higher"`` or ``"lower"``), so metrics added by
other probes (custom labels) appear without changes here.

Aggregation: for each model, layer and metric, the values of every repeat of every seed are
pooled; ``mean`` and ``std`` (population) are over that pool (``n`` values), so the spread
holds both the sampling noise of the probes and the training noise between seeds.
``seed_means`` keeps each seed's own mean. A model's **best layer** for a metric is the layer
with the best mean; the **winner** is the model with the best best-layer mean. Two models are
**within each other's spread** when their best-layer means differ by no more than the larger
of their two stds: such a difference cannot be told from noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from musicbert.evaluate import summarise
from musicbert.probes import METRIC_KIND

RANDOM_INIT = "random-init"


class ReportError(ValueError):
    """metrics.json files that cannot be compared; the message says which and why."""


def _direction(better: dict[str, str], metric: str) -> str:
    d = better.get(metric)
    if d not in ("higher", "lower"):
        raise ReportError(f"metric {metric!r}: 'better' must be 'higher' or 'lower', got {d!r}")
    return d


def direction_label(direction: str) -> str:
    return "↑ higher is better" if direction == "higher" else "↓ lower is better"


def _metric_names(all_metrics: list[dict]) -> tuple[list[str], dict[str, str]]:
    """Metric names in first-seen order (the evaluator's order), and their directions."""
    names: list[str] = []
    better: dict[str, str] = {}
    for metrics in all_metrics:
        for m in list(metrics.get("better", {})) + [m for per in metrics["layers"].values() for m in per]:
            if m not in better:
                if m not in metrics.get("better", {}):
                    raise ReportError(f"metric {m!r} has no direction in its metrics.json's 'better'")
                names.append(m)
                better[m] = _direction(metrics["better"], m)
            elif metrics.get("better", {}).get(m, better[m]) != better[m]:
                raise ReportError(f"metric {m!r} is 'higher' is better in one metrics.json and 'lower' in another")
    return names, better


def _pool(per_seed: list[dict], metric: str, layer: str) -> dict:
    values, seed_means = [], []
    for metrics in per_seed:
        cell = metrics["layers"].get(layer, {}).get(metric)
        if cell is None:
            continue
        values += cell.get("values") or [cell.get("mean")]
        seed_means.append(cell.get("mean"))
    pooled = summarise(values)
    return pooled | {"n": sum(v is not None for v in pooled["values"]), "seed_means": seed_means}


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "higher" else a < b


def within_spread(a: dict, b: dict) -> bool:
    """Best-layer cells ``{"mean", "std"}`` whose means differ by at most the larger std."""
    return abs(a["mean"] - b["mean"]) <= max(a["std"] or 0.0, b["std"] or 0.0)


def aggregate(results: dict[str, list[dict]], seeds: list[int] | None = None) -> dict:
    """``{model: [metrics.json of each seed]}`` -> the study's ``results.json`` dict."""
    if not results:
        raise ReportError("no models to compare")
    names, better = _metric_names([m for per_seed in results.values() for m in per_seed])
    models: dict[str, dict] = {}
    for model, per_seed in results.items():
        layers = sorted({int(layer) for metrics in per_seed for layer in metrics["layers"]})
        models[model] = {
            "random_init": all(m.get("settings", {}).get("random_init", False) for m in per_seed),
            "seeds": seeds if model != RANDOM_INIT and seeds else None,
            "runs": len(per_seed),
            "repeats": sorted({m.get("settings", {}).get("repeats") for m in per_seed} - {None}),
            "layers": {str(l): {m: _pool(per_seed, m, str(l)) for m in names} for l in layers},
        }
    best: dict[str, dict] = {}
    for m in names:
        per_model = {}
        for model, info in models.items():
            cells = [(int(l), c[m]) for l, c in info["layers"].items() if c[m]["mean"] is not None]
            if not cells:
                continue
            layer, cell = cells[0]
            for l, c in cells[1:]:
                if _better(c["mean"], cell["mean"], better[m]):
                    layer, cell = l, c
            per_model[model] = {"layer": layer, "mean": cell["mean"], "std": cell["std"], "n": cell["n"]}
        winner = None
        for model, cell in per_model.items():
            if winner is None or _better(cell["mean"], per_model[winner]["mean"], better[m]):
                winner = model
        ranked = list(per_model)
        overlaps = [[a, b] for i, a in enumerate(ranked) for b in ranked[i + 1:] if within_spread(per_model[a], per_model[b])]
        best[m] = {"models": per_model, "winner": winner, "within_spread": overlaps}
    return {"metrics": names, "better": better, "models": models, "best": best}


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "n/a"
    std = "" if cell["std"] is None else f" ± {cell['std']:.3f}"
    return f"{cell['mean']:.3f}{std} (L{cell['layer']})"


def _ties(best: dict) -> str:
    """The models within the winner's spread ("≈ A, B"), or "all: no clear winner"."""
    winner = best["winner"]
    tied = [b if a == winner else a for a, b in best["within_spread"] if winner in (a, b)]
    if not tied:
        return "none: the winner stands out"
    if len(tied) == len(best["models"]) - 1:
        return "all: no clear winner"
    return "≈ " + ", ".join(tied)


def markdown_table(agg: dict) -> str:
    """Per metric: each model's best layer and value (mean ± std), the winner marked ★ and the
    pairs of models within each other's spread."""
    models = list(agg["models"])
    repeats = sorted({r for info in agg["models"].values() for r in info["repeats"]})
    seeds = next((info["seeds"] for info in agg["models"].values() if info["seeds"]), None) or []
    lines = [
        "# Probing study",
        "",
        f"Each cell: the model's best layer (L) for the metric and its value there, mean ± std over "
        f"{'/'.join(map(str, repeats)) or '?'} repeats × {len(seeds) or 1} seed(s) ({', '.join(map(str, seeds)) or '-'}) pooled. "
        "**★** the winner. Last column: the models within the winner's spread (≈: the two means "
        "differ by no more than the larger of the two stds), a difference that cannot be told from noise; "
        "results.json lists every such pair (`best.<metric>.within_spread`).",
        "",
        "| metric | better | " + " | ".join(models) + " | winner | within the winner's spread |",
        "|---|:---:|" + "---:|" * len(models) + "---|---|",
    ]
    for m in agg["metrics"]:
        b = agg["best"][m]
        cells = []
        for model in models:
            text = _cell(b["models"].get(model))
            cells.append(f"**{text} ★**" if model == b["winner"] else text)
        arrow = "↑ higher" if agg["better"][m] == "higher" else "↓ lower"
        lines.append(f"| {m} | {arrow} | " + " | ".join(cells) + f" | {b['winner'] or 'n/a'} | {_ties(b)} |")
    return "\n".join(lines) + "\n"


def plot_study(agg: dict, path: str | Path, title: str | None = None) -> None:
    """One panel per metric: value against layer, one line per model with a mean ± std band;
    random-init dashed grey; each panel says which direction is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = agg["metrics"]
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows + 0.8), squeeze=False)
    trained = [m for m, info in agg["models"].items() if not info["random_init"]]
    for ax, metric in zip(axes.flat, names):
        for model, info in agg["models"].items():
            layers = sorted(int(l) for l in info["layers"])
            cells = [info["layers"][str(l)][metric] for l in layers]
            mean = np.array([np.nan if c["mean"] is None else c["mean"] for c in cells])
            std = np.array([0.0 if c["std"] is None else c["std"] for c in cells])
            if info["random_init"]:
                style = dict(color="0.45", linestyle="--", marker="x")
            else:
                style = dict(color=f"C{trained.index(model)}", linestyle="-", marker="o", markersize=4)
            ax.plot(layers, mean, label=model, **style)
            ax.fill_between(layers, mean - std, mean + std, color=style["color"], alpha=0.12, linewidth=0)
        best = agg["best"][metric]
        winner = f"\nbest: {best['winner']} (layer {best['models'][best['winner']]['layer']})" if best["winner"] else ""
        ax.set_title(f"{metric}  ({direction_label(agg['better'][metric])}){winner}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(METRIC_KIND.get(metric, "value"))
        all_layers = sorted({int(l) for info in agg["models"].values() for l in info["layers"]})
        ax.set_xticks(all_layers)
        ax.grid(True, alpha=0.35)
    spare = list(axes.flat)[len(names):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:  # the legend in the first empty panel, else below the panels
        spare[0].legend(handles, labels, loc="center", frameon=False)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    if title is None:
        seeds = next((info["seeds"] for info in agg["models"].values() if info["seeds"]), None) or []
        title = (f"Probing each layer: {len(trained)} trained models{' and random-init' if len(trained) < len(agg['models']) else ''}, "
                 f"{len(seeds) or 1} seed(s); band = ± std over repeats × seeds")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0 if spare else 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
