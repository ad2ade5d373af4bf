"""bench/gpu.py's CPU dry run: every phase of the one-command GPU check runs without a GPU.

One run (tiny model, gloo, bf16 autocast on CPU; about a minute on 2 idle cores) feeds the slow
tests below. Its resume phase is also the CPU bf16 training test: ``train_ddp.py`` with
``train.precision=bf16`` under torchrun learns (the loss falls) and, stopped by SIGTERM and
resumed, logs exactly the losses of an uninterrupted run. A fast test checks what a failing or
killed run leaves behind (the device time of a GPU run is too scarce to lose its figures).
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


@pytest.fixture
def gpu(monkeypatch):
    """bench/gpu.py as a module. It puts bench/ first on sys.path (where bench/preprocess.py would hide
    the preprocess package) and imports bench/train.py: both are undone afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    for name in set(sys.modules) - before:
        if name == spec.name or str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(REPO / "bench")):
            del sys.modules[name]


class Killed(BaseException):
    """Stands for the process being killed from outside (the device call's time limit)."""


def test_report_is_written_after_each_phase(gpu, monkeypatch, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(gpu, "load_data", lambda deadline, plan, shards, holder: holder.update(shards="s", batches=["b"]) or {"ok": True})
    monkeypatch.setattr(gpu, "check_layouts", lambda deadline, plan, device, batch: {"ok": batch == "b", "checks": []})

    def broken_speed(*_):
        raise RuntimeError("no kernel image")

    def killed_resume(*_):
        on_disk = json.loads(out.read_text())  # what a kill now would leave
        assert list(on_disk["phases"]) == ["data", "correctness", "speed"]
        raise Killed

    monkeypatch.setattr(gpu, "measure_speed", broken_speed)
    monkeypatch.setattr(gpu, "check_resume", killed_resume)
    with pytest.raises(Killed):
        gpu.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    assert report["phases"]["correctness"]["ok"] is True
    assert report["phases"]["speed"]["ok"] is False and report["phases"]["speed"]["error"] == "RuntimeError: no kernel image"
    assert report["result"].startswith("RESULT ok=0 ") and " correctness=pass " in report["result"]
    assert "[speed] FAILED: RuntimeError: no kernel image" in capsys.readouterr().out


def test_descendants_from_parent_ids(gpu):
    """The resume phase finds train_ddp.py under torchrun this way (and kills the whole tree)."""
    code = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(proc.stdout.readline())
        assert gpu._descendants(proc.pid) == [grandchild]
        assert proc.pid in gpu._descendants(os.getpid())
        assert gpu._descendants(os.getpid()).index(proc.pid) < gpu._descendants(os.getpid()).index(grandchild)
    finally:
        for pid in [*gpu._descendants(proc.pid), proc.pid]:
            os.kill(pid, 9)
        proc.wait()


def test_partial_report_is_not_ok(gpu):
    report = {"device": "cpu", "seconds": 1.0, "phases": {"data": {"ok": True}, "correctness": {"ok": True}}}
    assert gpu.result_line(report).startswith("RESULT ok=0 ")
    report["phases"] |= {"speed": {"ok": True}, "resume": {"ok": True}}
    assert gpu.result_line(report).startswith("RESULT ok=1 ")


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


@pytest.mark.slow
def test_result_line_and_json_agree(dry_run):
    report, stdout = dry_run
    line = stdout.strip().splitlines()[-1]
    assert line == report["result"] and line.startswith("RESULT ok=1 ")
    assert report["dry_run"] is True
    assert set(report["phases"]) == {"data", "correctness", "speed", "resume"}
    for name, phase in report["phases"].items():
        assert phase["ok"] and phase["seconds"] <= phase["budget_s"] + 5, name
    assert report["phases"]["data"]["bars"] == "real"


@pytest.mark.slow
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


@pytest.mark.slow
def test_speed_of_each_layout_and_hf(dry_run):
    report, _ = dry_run
    variants = report["phases"]["speed"]["variants"]
    for name in ("bars", "rows"):
        assert variants[name]["real_tokens_per_s"] > 0 and variants[name]["useful_tflops"] > 0
    assert "skipped" in variants["varlen"]
    if importlib.util.find_spec("transformers") is not None:
        assert variants["hf"]["real_tokens_per_s"] > 0


@pytest.mark.slow
def test_cpu_bf16_training_learns_and_resumes_exactly(dry_run):
    report, _ = dry_run
    (run,) = report["phases"]["resume"]["runs"].values()
    assert run["backend"] == "gloo" and run["precision"] == "bf16"
    assert 0 < run["resumed_at_step"] < run["steps"]  # really interrupted by SIGTERM, then resumed
    assert run["exact"] and run["max_rel_diff"] == 0.0
    assert run["loss_fell"] and run["loss_last_quarter"] < run["loss_first_quarter"]
