"""python -m musicbert.study: the study file, the comparison it writes, and the whole machinery.

- The study files load; what must be the same for every model cannot be set per model; an
  invalid model (BERT-dropout without dropout) is refused naming the model (fast).
- The comparison (musicbert.study_report) on hand-made metrics.json: pooled over seeds,
  best layer, winner, models within each other's spread, a metric the study has never heard
  of with its direction from "better"; the table and the figure (fast).
- Local: two models with a handful of steps under torchrun (2 ranks, gloo) on the bundled
  songs; the study process alone is killed (SIGKILL) once the first model is trained and the
  second has a checkpoint: torchrun and its ranks get SIGTERM from the kernel, checkpoint and
  end; started again the study does not retrain the first, resumes the second from its
  checkpoint, evaluates, and writes the three files; a third start repeats nothing (slow,
  ~2 min).
- SLURM with stand-ins for sbatch, squeue and scancel (fast): the options of each job; the
  jobs this study already has queued are kept, not submitted again; squeue failing stops
  the submission.
- SLURM (marker ``slurm``): on the local SLURM of scripts/slurm_local.sh (see test_launch.py),
  four training jobs through launch.sh and an evaluation job that waits for them (afterok);
  a study submitted twice has one job per run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from musicbert.config import ConfigError
from musicbert.probes import METRICS
from musicbert.study import load_study, plan_runs, training_config
from musicbert.study_report import aggregate, markdown_table, plot_study
from test_launch import Slurm, _wait, slurm  # noqa: F401  (slurm: the local SLURM fixture)

REPO = Path(__file__).resolve().parents[1]
MODES = ("BERT", "BERT-aug", "BERT-neighbor", "BERT-dropout")  # the study files name each model after its mode


# ----------------------------------------------------------------------------- the study file


@pytest.mark.parametrize("name", ["study.yaml", "study_demo.yaml"])
def test_study_files_declare_four_models_trained_alike(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study(REPO / "configs" / name, ["seeds=[3, 4]"])
    runs = plan_runs(study)
    assert [(r.model, r.seed) for r in runs] == [(m, s) for m in MODES for s in (3, 4)]
    cfgs = {r.name: training_config(study, r) for r in runs}
    for run in runs:
        cfg = cfgs[run.name]
        assert cfg["objective"]["mode"] == run.model
        assert cfg["train"]["seed"] == cfg["data"]["seed"] == run.seed
        assert cfg["train"]["max_steps"] == study.steps and cfg["data"]["shards"] == study.shards
        assert cfg["run_dir"] == str(tmp_path / study.out / "runs" / run.name)
        assert cfg["model"]["dropout"] == (0.1 if run.model == "BERT-dropout" else 0.0)
        # apart from the mode (and dropout), every model's config is the same
        same = {k: v for k, v in cfg.items() if k not in ("run_dir", "objective")} | {"model": {**cfg["model"], "dropout": 0}}
        first = cfgs[f"BERT-seed{run.seed}"]
        assert same == {k: v for k, v in first.items() if k not in ("run_dir", "objective")} | {"model": {**first["model"], "dropout": 0}}


def test_a_model_set_to_null_is_left_out():
    study = load_study(REPO / "configs" / "study.yaml", ["models.BERT-aug=null", "models.Mine.objective.mode=BERT"])
    assert list(study.models) == ["BERT", "BERT-neighbor", "BERT-dropout", "Mine"]


@pytest.mark.parametrize("override, message", [
    (["models.BERT.train.max_steps=5"], "models.BERT.train.max_steps: set by the study"),
    (["common.data.seed=1"], "common.data.seed: set by the study"),
    (["models.Mine.objective.mode=BERT-dropout"], "models.Mine: objective.mode BERT-dropout needs model.dropout > 0"),
    (["models.BERT.objective.mode=BERT-typo"], "models.BERT: objective.mode 'BERT-typo'"),
    (["eval.options.no_such_option=1"], "eval.options.no_such_option is not an option"),
    (["stepz=3"], "unknown key stepz"),
    (["seeds=[1, 1]"], "seeds ([1, 1])"),
    (["seeds=[1, x]"], "seeds[1]: expected int"),
    (["models={}"], "at least one model"),
])
def test_bad_study_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_study(REPO / "configs" / "study.yaml", override)


# ----------------------------------------------------------------------------- the comparison


def fake_metrics(per_layer: dict[str, list[list[float]]], better: dict[str, str], random_init: bool = False) -> dict:
    """A metrics.json: ``per_layer[metric][layer - 1]`` holds that layer's repeat values."""
    layers = range(1, len(next(iter(per_layer.values()))) + 1)
    return {
        "layers": {str(l): {m: {"mean": sum(v[l - 1]) / len(v[l - 1]), "std": 0.0, "values": v[l - 1]}
                            for m, v in per_layer.items()} for l in layers},
        "better": better,
        "settings": {"random_init": random_init, "repeats": 2},
    }


def test_comparison_pools_seeds_and_marks_winner_and_spread(tmp_path):
    better = {"chords": "higher", "style": "lower"}  # "style": a metric the study does not know
    results = {
        # chords: A's best layer is 2 (pooled over 2 seeds: 0.80, 0.82, 0.84, 0.86 -> 0.83 ± 0.0224)
        "A": [fake_metrics({"chords": [[0.6, 0.6], [0.80, 0.82]], "style": [[2.0, 2.0], [1.0, 1.2]]}, better),
              fake_metrics({"chords": [[0.6, 0.6], [0.84, 0.86]], "style": [[2.0, 2.0], [1.0, 1.2]]}, better)],
        # B: best chords at layer 1, 0.815 ± 0.005: within A's spread; style far worse
        "B": [fake_metrics({"chords": [[0.81, 0.82], [0.5, 0.5]], "style": [[3.0, 3.0], [3.0, 3.2]]}, better)],
        "random-init": [fake_metrics({"chords": [[0.5, 0.5], [0.5, 0.5]], "style": [[1.5, 1.5], [1.6, 1.6]]}, better,
                                     random_init=True)],
    }
    agg = aggregate(results, seeds=[0, 1])
    assert agg["metrics"] == ["chords", "style"] and agg["better"] == better
    pooled = agg["models"]["A"]["layers"]["2"]["chords"]
    assert pooled["n"] == 4 and pooled["mean"] == pytest.approx(0.83) and pooled["std"] == pytest.approx(0.02236, abs=1e-4)
    assert pooled["seed_means"] == [pytest.approx(0.81), pytest.approx(0.85)]
    chords, style = agg["best"]["chords"], agg["best"]["style"]
    assert chords["models"]["A"]["layer"] == 2 and chords["models"]["B"]["layer"] == 1
    assert chords["winner"] == "A" and ["A", "B"] in chords["within_spread"]
    assert ["A", "random-init"] not in chords["within_spread"]
    # lower is better: A's 1.1 beats random-init's 1.5 and B's 3.0
    assert style["winner"] == "A" and style["models"]["A"]["mean"] == pytest.approx(1.1)
    assert style["within_spread"] == []

    table = markdown_table(agg)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "metric" not in line}
    assert set(rows) == {"chords", "style"}
    assert "**0.830 ± 0.022 (L2) ★**" in rows["chords"] and "0.815 ± 0.005 (L1)" in rows["chords"]
    assert "≈ B" in rows["chords"] and "↑ higher" in rows["chords"]
    assert "↓ lower" in rows["style"] and "the winner stands out" in rows["style"]

    plot_study(agg, tmp_path / "figure.png")
    png = (tmp_path / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_comparison_refuses_metric_without_direction():
    from musicbert.study_report import ReportError

    m = fake_metrics({"chords": [[0.5]]}, {})
    with pytest.raises(ReportError, match="'chords' has no direction"):
        aggregate({"A": [m]})


# ----------------------------------------------------------------------------- the machinery, locally


def tiny_study(tmp_path: Path, shards: Path, models: list[str], steps: int, **extra: str) -> Path:
    """A study file with tiny models (2 layers, dim 32) from configs/demo.yaml."""
    model_lines = "\n".join(f"  {m}: {{objective: {{mode: {m}}}{', model: {dropout: 0.1}' if m == 'BERT-dropout' else ''}}}"
                            for m in models)
    text = f"""
config: {REPO / 'configs' / 'demo.yaml'}
out: {tmp_path / 'study'}
shards: {shards}
steps: {steps}
nproc_per_node: 2
common:
  model: {{dim: 32, n_layers: 2, n_heads: 2, ff_dim: 64, rotary_dims: 8}}
  data: {{max_tokens: 1024, row_len: 512, workers: 1}}
  train: {{warmup_steps: 3, log_every: 1, val_every: 1000, val_batches: 2, ckpt_every: 5}}
models:
{model_lines}
eval: {{repeats: 2, train_bars: 3, test_bars: 5, max_songs: 8, device: cpu, threads: 1}}
""" + "".join(f"{k}: {v}\n" for k, v in extra.items())
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def study_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def run_study(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "musicbert.study", "--config", str(config), *args], cwd=REPO,
                       env=study_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def started_at(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), or None once it has ended.

    A zombie counts as ended: the study's orphans are reparented to a PID 1 that may never
    reap them. The start time tells a process from a later one that reuses its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_all(processes: dict[int, str | None]) -> None:
    """SIGKILL each ``{pid: started_at(pid)}`` still running (cleaning up after a failed test)."""
    for pid, start in processes.items():
        if started_at(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_local_study_killed_midway_stops_its_trainings_and_resumes_without_redoing(tmp_path, example_shards):
    config = tiny_study(tmp_path, example_shards, ["BERT", "BERT-neighbor"], steps=40)
    out = tmp_path / "study"
    first, second = out / "runs" / "BERT-seed0", out / "runs" / "BERT-neighbor-seed0"
    log1 = tmp_path / "first-start.log"
    proc = subprocess.Popen([sys.executable, "-m", "musicbert.study", "--config", str(config)], cwd=REPO, env=study_env(),
                            stdout=log1.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    trainers: dict[int, str | None] = {}
    try:
        def midway() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the study ended before it could be killed:\n{log1.read_text()[-3000:]}")
            return (first / "checkpoints" / "step_00000040.pt").is_file() and any((second / "checkpoints").glob("step_*.pt"))

        _wait(midway, 240, "the first model trained and the second's first checkpoint", lambda: log1.read_text()[-3000:])
        trainers = {pid: started_at(pid) for pid in descendants(proc.pid)}
        commands = [command_line(pid) for pid in trainers]
        assert sum("torch.distributed.run" in c for c in commands) == 1, commands
        assert sum("train_ddp.py" in c and "torch.distributed.run" not in c for c in commands) >= 2, commands
        os.kill(proc.pid, signal.SIGKILL)  # the study alone, as the OOM killer would
        proc.wait()
        _wait(lambda: all(started_at(pid) != start for pid, start in trainers.items()), 120,
              "torchrun, its ranks and their workers to end after kill -9 of the study",
              lambda: "\n".join(f"{pid}: {command_line(pid)}" for pid, start in trainers.items() if started_at(pid) == start))
    finally:
        kill_all({proc.pid: started_at(proc.pid), **trainers, **{pid: started_at(pid) for pid in descendants(proc.pid)}})
        proc.wait()
    assert "stop signal received; checkpoint written" in (out / "logs" / "BERT-neighbor-seed0.log").read_text(), \
        "torchrun's ranks did not get the SIGTERM that stops them when the study dies"
    assert not (second / "checkpoints" / "step_00000040.pt").exists(), "the second model finished before the kill: make it longer"
    assert not (out / "results.json").exists()
    before = snapshot(first)

    r = run_study(config)
    text = r.stdout + r.stderr
    assert "BERT-seed0: already trained" in text
    assert snapshot(first) == before, "the finished model was trained again"
    assert (out / "logs" / "BERT-seed0.log").read_text().count("\n==== ") == 1
    assert (out / "logs" / "BERT-neighbor-seed0.log").read_text().count("\n==== ") == 2
    assert "resumed from" in (out / "logs" / "BERT-neighbor-seed0.log").read_text()
    steps = [json.loads(line)["step"] for line in (second / "log.jsonl").read_text().splitlines()
             if json.loads(line).get("kind", "train") == "train"]
    assert sorted(set(steps)) == list(range(1, 41))

    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["BERT", "BERT-neighbor", "random-init"]
    assert results["metrics"][: len(METRICS)] == list(METRICS)
    for name, info in results["models"].items():
        assert sorted(info["layers"]) == ["1", "2"], name
        assert info["random_init"] == (name == "random-init")
    for m in results["metrics"]:
        assert results["best"][m]["winner"] in results["models"]
    table = (out / "table.md").read_text()
    assert "| song_clustering | ↓ lower |" in table and "★" in table
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    # every model was probed with the same bars: same sampling seed and counts
    settings = [json.loads((out / "eval" / n / "metrics.json").read_text())["settings"]
                for n in ("BERT-seed0", "BERT-neighbor-seed0", "random-init")]
    assert len({(s["seed"], s["train_bars"], s["test_bars"], s["repeats"]) for s in settings}) == 1

    evals = {n: (out / "eval" / n / "metrics.json").stat().st_mtime_ns for n in ("BERT-seed0", "random-init")}
    r = run_study(config)
    assert (r.stdout + r.stderr).count("already trained") == 2 and (r.stdout + r.stderr).count("already evaluated") == 3
    assert {n: (out / "eval" / n / "metrics.json").stat().st_mtime_ns for n in evals} == evals


# ----------------------------------------------------------------------------- SLURM


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """sbatch, squeue and scancel stand-ins on PATH. sbatch logs its arguments to calls.log and
    prints 101, 102, ...; squeue prints squeue.out (nothing if absent) and logs its arguments
    to squeue.log; scancel logs its arguments to scancel.log. Returns the folder of the logs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": 'printf "%s\\n" "$@" "--END--" >>"$FAKE/calls.log"\n'
                         'n=$(grep -c -- --END-- "$FAKE/calls.log"); echo "$((100 + n))"',
               "squeue": 'printf "%s\\n" "$@" >"$FAKE/squeue.log"; cat "$FAKE/squeue.out" 2>/dev/null || true',
               "scancel": 'printf "%s\\n" "$@" >>"$FAKE/scancel.log"'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(tmp_path))
    return tmp_path


def sbatch_calls(fake: Path) -> list[list[str]]:
    log = fake / "calls.log"
    return [c.split("\n")[:-1] for c in log.read_text().split("--END--\n") if c] if log.exists() else []


def test_slurm_submission_with_a_fake_sbatch(tmp_path, example_shards, fake_sbatch, capsys):
    """Without SLURM: launch.sh per run not yet trained, then the evaluation job after them."""
    from musicbert import study as study_module

    config = tiny_study(tmp_path, example_shards, list(MODES), steps=4)
    done = tmp_path / "study" / "runs" / "BERT-aug-seed0" / "checkpoints" / "step_00000004.pt"
    done.parent.mkdir(parents=True)
    done.write_bytes(b"")  # BERT-aug counts as trained: no job for it
    assert study_module.main(["--config", str(config), "--slurm", "slurm.gpus_per_node=0", "slurm.sbatch=[--partition=p1]"]) == 0
    printed = capsys.readouterr().out
    calls = sbatch_calls(fake_sbatch)
    assert len(calls) == 4
    for call, model, job in zip(calls, ("BERT", "BERT-neighbor", "BERT-dropout"), (101, 102, 103)):
        run = tmp_path / "study" / "runs" / f"{model}-seed0"
        assert call[-2:] == [str(tmp_path / "study" / "configs" / f"{model}-seed0.yaml"), f"run_dir={run}"]
        assert "--gres=none" in call and "--partition=p1" in call and "--parsable" in call
        assert f"{model}-seed0: job {job} -> {run}" in printed
    assert "BERT-aug-seed0: already trained" in printed and "evaluation: job 104 after jobs 101, 102, 103" in printed
    evaluation = calls[3]
    assert "--dependency=afterok:101:102:103" in evaluation and "--kill-on-invalid-dep=yes" in evaluation
    assert "--gres=gpu:1" in evaluation and "--partition=p1" in evaluation
    wrap = next(a for a in evaluation if a.startswith("--wrap="))
    assert wrap.endswith(f"-m musicbert.study --config {tmp_path / 'study' / 'study.yaml'} --evaluate-only")



def test_slurm_submission_keeps_the_jobs_this_study_has_queued(tmp_path, example_shards, fake_sbatch, capsys):
    """Without SLURM: a run whose job squeue lists (its name, its log in this study's folder)
    is not submitted again; a job of the same name from another study does not count; the
    queued evaluation job, which would not wait for the new jobs, is replaced."""
    from musicbert import study as study_module

    config = tiny_study(tmp_path, example_shards, list(MODES), steps=4)
    logs = tmp_path / "study" / "slurm"
    (fake_sbatch / "squeue.out").write_text(
        f"207|study-BERT-seed0|{logs}/BERT-seed0-%j.out\n"
        f"201|study-BERT-seed0|{logs}/BERT-seed0-%j.out\n"  # submitted twice before: the earliest counts
        f"202|study-BERT-aug-seed0|{tmp_path}/other-study/slurm/BERT-aug-seed0-%j.out\n"
        f"203|study-BERT-dropout-seed0|{logs}/BERT-dropout-seed0-%j.out\n"
        f"204|study-evaluate|{logs}/evaluate-%j.out\n")
    assert study_module.main(["--config", str(config), "--slurm", "slurm.gpus_per_node=0"]) == 0
    printed = capsys.readouterr().out
    squeue_args = (fake_sbatch / "squeue.log").read_text().split()
    assert "--me" in squeue_args and "--states=PENDING,CONFIGURING,RUNNING,SUSPENDED,REQUEUED" in squeue_args
    assert f"--name={','.join(f'study-{m}-seed0' for m in MODES)},study-evaluate" in squeue_args
    calls = sbatch_calls(fake_sbatch)
    assert [c[-1] for c in calls[:2]] == [f"run_dir={tmp_path / 'study' / 'runs' / r}" for r in ("BERT-aug-seed0", "BERT-neighbor-seed0")]
    assert "BERT-seed0: job 201 (already queued, not submitted again)" in printed
    assert "BERT-dropout-seed0: job 203 (already queued, not submitted again)" in printed
    assert "BERT-aug-seed0: job 101 ->" in printed and "BERT-neighbor-seed0: job 102 ->" in printed
    assert (fake_sbatch / "scancel.log").read_text().split() == ["204"]
    assert len(calls) == 3 and "--dependency=afterok:201:101:102:203" in calls[2]
    assert "evaluation: job 103 after jobs 201, 101, 102, 203 succeed" in printed

    # Everything queued: nothing is submitted or cancelled.
    (fake_sbatch / "squeue.out").write_text("".join(f"{300 + i}|study-{name}|{logs}/{name}-%j.out\n" for i, name in
                                                   enumerate([f"{m}-seed0" for m in MODES] + ["evaluate"])))
    assert study_module.main(["--config", str(config), "--slurm", "slurm.gpus_per_node=0"]) == 0
    printed = capsys.readouterr().out
    assert len(sbatch_calls(fake_sbatch)) == 3 and (fake_sbatch / "scancel.log").read_text().split() == ["204"]
    assert printed.count("(already queued, not submitted again)") == 5
    assert "evaluation: job 304 (already queued, not submitted again) after jobs 300, 301, 302, 303 succeed" in printed


def test_slurm_submission_stops_when_squeue_fails(tmp_path, example_shards, fake_sbatch, capsys):
    from musicbert import study as study_module

    (fake_sbatch / "bin" / "squeue").write_text("#!/usr/bin/env bash\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    config = tiny_study(tmp_path, example_shards, ["BERT"], steps=4)
    assert study_module.main(["--config", str(config), "--slurm"]) == 2
    assert "squeue failed (exit 1): slurm_load_jobs error" in capsys.readouterr().err
    assert sbatch_calls(fake_sbatch) == []



@pytest.mark.slurm
@pytest.mark.slow
def submit_study(slurm: Slurm, config: Path, *overrides: str) -> tuple[dict[str, str], str]:  # noqa: F811
    """``python -m musicbert.study --slurm`` with small CPU jobs: ``({run name or "evaluation": job id}, stdout)``."""
    small = ["slurm.nodes=1", "slurm.gpus_per_node=0", "slurm.nproc_per_node=1", "slurm.cpus_per_task=1",
             "slurm.time=00:10:00", "slurm.eval_gpus=0", "slurm.eval_cpus=1", "slurm.eval_time=00:10:00"]
    env = study_env() | slurm.env | {"PYTHONPATH": str(REPO), "RDZV_HOST": "127.0.0.1", "PYTHON": sys.executable}
    r = subprocess.run([sys.executable, "-m", "musicbert.study", "--config", str(config), "--slurm", *small, *overrides],
                       cwd=config.parent, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = dict(line.split(": job ")[0:2] for line in r.stdout.splitlines() if ": job " in line)
    return {name: rest.split()[0] for name, rest in jobs.items()}, r.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_study_submitted_twice_has_one_job_per_run(slurm: Slurm, tmp_path, example_shards):  # noqa: F811
    config = tiny_study(tmp_path, example_shards, ["BERT", "BERT-neighbor"], steps=4)
    later = "slurm.sbatch=[--begin=now+1hour]"  # the jobs stay pending: nothing trains
    jobs, _ = submit_study(slurm, config, later)
    try:
        again, printed = submit_study(slurm, config, later)
        assert again == jobs and printed.count("(already queued, not submitted again)") == 3, printed
        queue = slurm.run("squeue", "--noheader", "--states=PENDING,RUNNING", "--format=%i %j").stdout.split("\n")
        names = sorted(line.split()[1] for line in queue if line.strip() and line.split()[0] in jobs.values())
        assert names == ["study-BERT-neighbor-seed0", "study-BERT-seed0", "study-evaluate"], queue
        assert len([line for line in queue if line.strip()]) == 3, queue
        dependency = slurm.job(jobs["evaluation"]).get("Dependency", "")
        assert f"afterok:{jobs['BERT-seed0']}" in dependency and f"afterok:{jobs['BERT-neighbor-seed0']}" in dependency
    finally:
        slurm.run("scancel", *jobs.values(), check=False)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_study_submits_four_trainings_and_an_evaluation_after_them(slurm: Slurm, tmp_path, example_shards):  # noqa: F811
    config = tiny_study(tmp_path, example_shards, list(MODES), steps=4)
    jobs, printed = submit_study(slurm, config)
    assert set(jobs) == {f"{m}-seed0" for m in MODES} | {"evaluation"}, printed
    out = tmp_path / "study"
    try:
        dependency = slurm.job(jobs["evaluation"]).get("Dependency", "")
        for name, job_id in jobs.items():
            if name != "evaluation":
                assert f"afterok:{job_id}" in dependency, dependency
        diag = lambda: slurm.diagnostics(*sorted((out / "slurm").glob("*.out")))  # noqa: E731
        info = _wait(lambda: (j := slurm.job(jobs["evaluation"])) and j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and j,
                     420, "the evaluation job to finish", diag)
        assert info["JobState"] == "COMPLETED", f"{info}\n{diag()}"
    finally:
        slurm.run("scancel", *jobs.values(), check=False)
    ends = [slurm.job(job_id)["EndTime"] for name, job_id in jobs.items() if name != "evaluation"]
    assert all(slurm.job(j)["JobState"] == "COMPLETED" for j in jobs.values())
    assert info["StartTime"] >= max(ends), (info["StartTime"], ends)  # ISO times: the evaluation started after every training
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == [*MODES, "random-init"]
    assert (out / "figure.png").is_file() and (out / "table.md").is_file()
