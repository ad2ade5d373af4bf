"""bench/gpu.py's CPU dry run: every phase of the one-command GPU check runs without a GPU.

One run (tiny model, gloo, bf16 autocast on CPU; about a minute on 2 idle cores) feeds all the
tests below. Its resume phase is also the CPU bf16 training test: ``train_ddp.py`` with
``train.precision=bf16`` under torchrun learns (the loss falls) and, stopped by SIGTERM and
resumed, logs exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(example_shards, tmp_path_factory) -> tuple[dict, str]:
    """(the JSON report, stdout) of ``bench/gpu.py --dry-run`` on the bundled songs."""
    tmp = tmp_path_factory.mktemp("gpu_dry_run")
    out = tmp / "gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--shards", str(example_shards),
           "--work", str(tmp / "work"), "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(cmd, cwd=REPO, env=env | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    return json.loads(out.read_text()), r.stdout


def test_result_line_and_json_agree(dry_run):
    report, stdout = dry_run
    line = stdout.strip().splitlines()[-1]
    assert line == report["result"] and line.startswith("RESULT ok=1 ")
    assert report["dry_run"] is True
    assert set(report["phases"]) == {"data", "correctness", "speed", "resume"}
    for name, phase in report["phases"].items():
        assert phase["ok"] and phase["seconds"] <= phase["budget_s"] + 5, name
    assert report["phases"]["data"]["bars"] == "real"


def test_layouts_checked_against_math_attention(dry_run):
    report, _ = dry_run
    phase = report["phases"]["correctness"]
    ran = {(c["layout"], c["precision"]): c for c in phase["checks"] if "ok" in c}
    assert set(ran) == {("bars", "fp32"), ("bars", "bf16"), ("rows", "fp32"), ("rows", "bf16")}
    for check in ran.values():
        assert check["ok"] and check["used_layout"] == check["layout"]
        assert check["grads"] > 0 and all(v > 0 for v in check["values"].values())  # a real comparison, not a copy
    assert all(c["values"]["hidden"] < 1e-5 for k, c in ran.items() if k[1] == "fp32")
    skipped = [c for c in phase["checks"] if c["layout"] == "varlen"]
    assert skipped and all("skipped" in c for c in skipped)  # no flash kernel on CPU


def test_speed_of_each_layout_and_hf(dry_run):
    report, _ = dry_run
    variants = report["phases"]["speed"]["variants"]
    for name in ("bars", "rows"):
        assert variants[name]["real_tokens_per_s"] > 0 and variants[name]["useful_tflops"] > 0
    assert "skipped" in variants["varlen"]
    if importlib.util.find_spec("transformers") is not None:
        assert variants["hf"]["real_tokens_per_s"] > 0


def test_cpu_bf16_training_learns_and_resumes_exactly(dry_run):
    report, _ = dry_run
    (run,) = report["phases"]["resume"]["runs"].values()
    assert run["backend"] == "gloo" and run["precision"] == "bf16"
    assert 0 < run["resumed_at_step"] < run["steps"]  # really interrupted by SIGTERM, then resumed
    assert run["exact"] and run["max_rel_diff"] == 0.0
    assert run["loss_fell"] and run["loss_last_quarter"] < run["loss_first_quarter"]
