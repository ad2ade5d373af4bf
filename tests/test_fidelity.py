"""Fidelity to the reference on the development corpus (``bench/fidelity.py``), held to the targets.

Runs the preprocessor on the 523 files of ``../shared/fidelity/reference_bars_dev.jsonl.gz`` (about
a minute with 2 workers) and compares bar for bar, as the benchmark does. Skips where ``../shared``
is absent.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO, SHARED_DATA

REFERENCE = SHARED_DATA.parent / "fidelity" / "reference_bars_dev.jsonl.gz"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_fidelity", REPO / "bench" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fidelity():
    if not REFERENCE.is_file() or not SHARED_DATA.is_dir():
        pytest.skip(f"{REFERENCE} or {SHARED_DATA} not present (development corpus is optional)")
    bench = load_bench()
    return bench, bench.measure(SHARED_DATA, REFERENCE, workers=2)


@pytest.mark.slow
def test_bars_and_notes_match_the_reference(fidelity):
    bench, fid = fidelity
    assert fid.both_kept == fid.ref_kept > 100  # every file the reference keeps is kept here
    assert fid.both_bars == fid.ref_bars  # ... with the same bars
    assert fid.identical_notes / fid.both_bars >= 0.99, bench.report(fid)
    # every bar whose tokens differ is explained by a documented tempo defect of the reference
    assert not fid.classes, bench.report(fid)
    assert set(fid.tempo_classes) <= {f"tempo: {d}" for d in bench.TEMPO_DEFECTS} | {
        f"tempo: {a} + {b}" for i, a in enumerate(bench.TEMPO_DEFECTS) for b in bench.TEMPO_DEFECTS[i + 1:]
    }, bench.report(fid)
    assert fid.identical_tokens + sum(fid.tempo_classes.values()) == fid.both_bars
    assert not fid.fewer_notes, bench.report(fid)  # no note lost


@pytest.mark.slow
def test_labels_agree_with_the_reference(fidelity):
    bench, fid = fidelity
    for name in ("instruments", "groove", "mean_velocity", "mean_duration"):
        assert fid.label_agree[name] / fid.both_bars >= 0.99, bench.report(fid)


@pytest.mark.slow
def test_true_chords_of_the_mma_songs(fidelity):
    """The bar's chord labels hold the true chord at least as often as the reference's, over all
    bars and on the bars where the chord changes (3,650 against 3,562 of 3,995 bars, and 3,595
    against 3,506 of 3,690, when written)."""
    bench, fid = fidelity
    for kind in ("all", "changes"):
        (ours, n), (ref, n_ref) = fid.chord_truth["ours", kind], fid.chord_truth["reference", kind]
        assert n == n_ref > 500
        assert ours >= ref, bench.report(fid)
