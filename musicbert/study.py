"""The paper's study in one command: every objective trained alike, probed layer by layer, compared.

::

    python -m musicbert.study --config configs/study.yaml [--slurm] [--evaluate-only] [key=value ...]

A study file (``configs/study.yaml``; ``configs/study_demo.yaml`` is ``make study``) names a
training config every model starts from, the settings all models share (shards, step budget,
seeds, ``common`` training overrides), one entry per model with what makes it that model
(``models.BERT-dropout: {objective: {mode: BERT-dropout}, model: {dropout: 0.1}}``) and the
evaluation settings. Dotted overrides on the command line change the study file
(``steps=100``, ``seeds=[0,1,2]``, ``eval.repeats=3``, ``common.train.lr=3e-4``;
``models.BERT-aug=null`` leaves a model out).

What it does, in the folder ``out`` (STUDY)::

    STUDY/study.yaml                 the resolved study (absolute paths): what the jobs run
    STUDY/configs/<model>-seed<s>.yaml   each run's full training config
    STUDY/runs/<model>-seed<s>/      each run's folder (train_ddp.py: checkpoints, log.jsonl, tb/)
    STUDY/logs/<model>-seed<s>.log   torchrun's output of local runs (appended on resume)
    STUDY/slurm/                     the SLURM logs (with --slurm)
    STUDY/eval/<model>-seed<s>/, STUDY/eval/random-init/   metrics.json, metrics.md, layers.png
    STUDY/results.json, table.md, figure.png                 the comparison (musicbert.study_report)

1. Train every model x seed with the same data, seed (``train.seed`` and ``data.seed``) and
   step budget (``train.max_steps = steps``): one after the other under ``torchrun`` on this
   machine, or with ``--slurm`` one ``launch.sh`` job each, then an evaluation job that starts
   when all of them succeeded (``--dependency=afterok``) and runs this module with
   ``--evaluate-only``.
2. Evaluate each run's checkpoint at the step budget and one random-init model (of the first
   model's configuration, initialised from ``eval.seed``) with
   :func:`musicbert.evaluate.evaluate`: the same ``eval.seed`` draws the same bars for all.
3. Aggregate over seeds and write the table and the figure.

Resume: run the same command again. A run whose final checkpoint (at ``steps``) exists is not
trained again; an interrupted one resumes from its newest checkpoint (train_ddp.py resumes
exactly). An evaluation whose folder holds a metrics.json made with the same settings is not
repeated; evaluation folders are written whole or not at all, and an interrupted evaluation
resumes from the layers it had finished (its journal, :mod:`musicbert.probes.journal`). A study process that dies
(``kill -9``) takes its training down with it, checkpointed (Linux; see
:func:`_terminated_with_study`). With ``--slurm``, a run whose job is still queued or
running keeps that job rather than getting a second one (:func:`queued_jobs`).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from musicbert.api import ModelLoadError
from musicbert.checkpoint import checkpoint_path
from musicbert.config import ConfigError, build_section, load_config, read_config_file
from musicbert.inference import InferenceError
from musicbert.probes import DEFAULT_CLUSTERS, PROTOCOLS, TEST_BARS_PER_SONG, TRAIN_BARS_PER_SONG
from musicbert.shards import ShardFormatError
from musicbert.study_report import RANDOM_INIT, aggregate, markdown_table, plot_study

log = logging.getLogger("musicbert.study")

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train_ddp.py"
LAUNCH_SCRIPT = REPO / "launch.sh"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no dots: names appear in dotted overrides
# Keys a model entry may not set: they are the study's, the same for every model.
_SHARED_KEYS = ("run_dir", "data.shards", "data.seed", "train.seed", "train.max_steps")


class StudyError(RuntimeError):
    """The study cannot go on (a run failed, an input is missing); the message says which."""


@dataclass
class EvalSettings:
    """How every model is probed (the options of :func:`musicbert.evaluate.evaluate`)."""

    layers: str = "all"
    repeats: int = 5
    protocol: str = "standard"
    seed: int = 0  # bar sampling, k-means and the random-init model's weights
    device: str = "auto"
    clusters: int = DEFAULT_CLUSTERS
    max_songs: int | None = None
    train_bars: int = TRAIN_BARS_PER_SONG
    test_bars: int = TEST_BARS_PER_SONG
    precision: str = "fp32"
    batch_tokens: int = 16384
    threads: int | None = None  # torch CPU threads (None: PyTorch's choice)
    random_init: bool = True  # also evaluate an untrained model, the baseline to beat
    options: dict = field(default_factory=dict)  # further keyword arguments of evaluate()

    def validate(self) -> None:
        from musicbert.evaluate import evaluate

        if self.repeats < 1:
            raise ConfigError(f"eval.repeats ({self.repeats}) must be >= 1")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol {self.protocol!r} is not one of {list(PROTOCOLS)}")
        known = set(inspect.signature(evaluate).parameters) - {"checkpoint", "shards", "out", "journal"}
        taken = {f.name for f in dataclasses.fields(self)} | {"train_bars_per_song", "test_bars_per_song", "random_init", "progress"}
        unknown = sorted(set(self.options) - (known - taken))
        if unknown:
            raise ConfigError(f"eval.options.{unknown[0]} is not an option of musicbert.evaluate.evaluate "
                              f"(valid: {', '.join(sorted(known - taken)) or 'none'})")

    def evaluate_kwargs(self) -> dict[str, Any]:
        return dict(
            layers=self.layers, repeats=self.repeats, protocol=self.protocol, seed=self.seed, device=self.device,
            clusters=self.clusters, max_songs=self.max_songs, precision=self.precision, batch_tokens=self.batch_tokens,
            train_bars_per_song=self.train_bars, test_bars_per_song=self.test_bars, **self.options,
        )


@dataclass
class SlurmSettings:
    """Resources of the SLURM jobs (``--slurm``); training jobs go through launch.sh."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU mode (gloo)
    nproc_per_node: int | None = None  # training processes per node (default: GPUs, or CPUs in CPU mode)
    cpus_per_task: int = 32
    time: str = "24:00:00"
    eval_gpus: int = 1
    eval_cpus: int = 8
    eval_time: str = "12:00:00"
    sbatch: list[str] = field(default_factory=list)  # more sbatch options for every job, e.g. --partition=gpu

    def validate(self) -> None:
        for key in ("nodes", "cpus_per_task", "eval_cpus"):
            if getattr(self, key) < 1:
                raise ConfigError(f"slurm.{key} ({getattr(self, key)}) must be >= 1")
        bad = [o for o in self.sbatch if not o.startswith("--") or "=" not in o]
        if bad:
            raise ConfigError(f"slurm.sbatch: {bad[0]!r} is not of the form --option=value")


@dataclass
class StudyConfig:
    config: str = "base.yaml"  # training config every model starts from (relative to the study file)
    out: str = "runs/study"
    shards: str = "shards/lmd"
    steps: int = 200_000  # train.max_steps of every run
    seeds: list[int] = field(default_factory=lambda: [0])
    nproc_per_node: int = 1  # local training: torchrun --nproc_per_node
    common: dict = field(default_factory=dict)  # training overrides for every model (nested, as in a config)
    models: dict = field(default_factory=dict)  # name -> nested training overrides of that model
    eval: EvalSettings = field(default_factory=EvalSettings)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def validate(self) -> None:
        self.eval.validate()
        self.slurm.validate()
        if self.steps < 1 or self.nproc_per_node < 1:
            raise ConfigError(f"steps ({self.steps}) and nproc_per_node ({self.nproc_per_node}) must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds ({self.seeds}) must be a non-empty list without repeats")
        if not self.models:
            raise ConfigError("models: the study needs at least one model")
        for name, overrides in self.models.items():
            if not isinstance(name, str) or not _NAME.match(name) or name == RANDOM_INIT:
                raise ConfigError(f"models.{name}: a model name is letters, digits, '_' and '-' (and not {RANDOM_INIT!r})")
            if not isinstance(overrides, dict):
                raise ConfigError(f"models.{name}: expected a mapping of training overrides, got {overrides!r}")
        for where, overrides in [("common", self.common), *((f"models.{n}", o) for n, o in self.models.items())]:
            shared = [k for k in _SHARED_KEYS if k in flatten(overrides)]
            if shared:
                raise ConfigError(f"{where}.{shared[0]}: set by the study for every model alike (use shards/steps/seeds/out)")


@dataclass(frozen=True)
class Run:
    """One model trained with one seed."""

    model: str
    seed: int
    study_out: Path

    @property
    def name(self) -> str:
        return f"{self.model}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.study_out / "runs" / self.name

    @property
    def config_file(self) -> Path:
        return self.study_out / "configs" / f"{self.name}.yaml"

    @property
    def eval_dir(self) -> Path:
        return self.study_out / "eval" / self.name

    def final_checkpoint(self, steps: int) -> Path:
        return checkpoint_path(self.run_dir, steps)


# ----------------------------------------------------------------------------- the description


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, dotted + ".")
        else:
            flat[dotted] = value
    return flat


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read and validate a study file; ``config`` becomes absolute (relative to the file), and
    ``out`` and ``shards`` too (relative to the working directory), so jobs can run anywhere."""
    path = Path(path)
    data = read_config_file(path, overrides)
    if isinstance(data.get("models"), dict):  # a model set to null is left out (models.BERT-aug=null)
        data["models"] = {name: o for name, o in data["models"].items() if o is not None}
    study = build_section(StudyConfig, data)
    config = Path(study.config)
    study.config = str(config if config.is_absolute() else (path.parent / config).resolve())
    study.out = str(Path(study.out).resolve())
    study.shards = str(Path(study.shards).resolve())
    for run in plan_runs(study):
        training_config(study, run)  # every model's config must load: fail before anything starts
    return study


def plan_runs(study: StudyConfig) -> list[Run]:
    """Every model with every seed, models in the study file's order."""
    return [Run(model, seed, Path(study.out)) for model in study.models for seed in study.seeds]


def training_config(study: StudyConfig, run: Run) -> dict:
    """The full, validated training config of ``run``: the study's base config, ``common``, the
    model's overrides, then what the study fixes for everyone (shards, budget, seeds, run_dir)."""
    fixed = {"run_dir": str(run.run_dir), "data.shards": study.shards, "train.max_steps": study.steps,
             "train.seed": run.seed, "data.seed": run.seed}
    flat = flatten(study.common) | flatten(study.models[run.model]) | fixed
    try:
        cfg = load_config(study.config, [f"{k}={json.dumps(v)}" for k, v in flat.items()])
    except ConfigError as exc:
        raise ConfigError(f"models.{run.model}: {exc}") from exc
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, for YAML


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_study_files(study: StudyConfig) -> list[Run]:
    """STUDY/study.yaml and one training config per run; returns the runs."""
    out = Path(study.out)
    write_atomic(out / "study.yaml", yaml.safe_dump(dataclasses.asdict(study), sort_keys=False))
    runs = plan_runs(study)
    for run in runs:
        write_atomic(run.config_file, yaml.safe_dump(training_config(study, run), sort_keys=False))
    return runs


def is_trained(run: Run, steps: int) -> bool:
    return run.final_checkpoint(steps).is_file()


# ----------------------------------------------------------------------------- training, locally


class Interrupted(Exception):
    """SIGTERM reached the study."""


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _terminated_with_study() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child (torchrun) receive SIGTERM when the study process
    dies, however it dies (``kill -9``, the OOM killer); None where that is not available.

    On Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in the forked child, before it runs
    torchrun: the setting survives the exec (torchrun is not set-uid) and torchrun does not
    change it; torchrun forwards the SIGTERM to its ranks, which checkpoint and stop, so a
    restarted study resumes instead of meeting a live run holding the run folder's lock.
    The kernel sends the signal when the *thread* that forked exits, not the process: the
    study forks from the thread that then waits for torchrun to end, so that thread outlives
    the child. If the study died between the fork and the prctl, the child exits at once.
    prctl is resolved here, in the parent: the child only makes the call.

    Elsewhere (macOS, Windows) there is no such call and None is returned: there, ``kill -9``
    of the study leaves torchrun and its ranks running, and they must be stopped by hand.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("prctl not found in the C library: kill -9 of the study will leave torchrun running")
        return None
    study_pid = os.getpid()
    args = [ctypes.c_ulong(a) for a in (signal.SIGTERM, 0, 0, 0)]

    def set_parent_death_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, *args) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != study_pid:  # the study is already gone: nobody waits for this run
            os._exit(1)

    return set_parent_death_signal


def train_local(study: StudyConfig, runs: list[Run]) -> None:
    """Train the runs one after the other with torchrun (gloo on CPU, NCCL on GPUs)."""
    if not TRAIN_SCRIPT.is_file():
        raise StudyError(f"{TRAIN_SCRIPT} not found: run the study from a clone of the repository")
    for i, run in enumerate(runs, 1):
        if is_trained(run, study.steps):
            log.info("[%d/%d] %s: already trained (%s)", i, len(runs), run.name, run.final_checkpoint(study.steps))
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={study.nproc_per_node}",
               str(TRAIN_SCRIPT), "--config", str(run.config_file)]
        logfile = Path(study.out) / "logs" / f"{run.name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        log.info("[%d/%d] %s: training %d steps on %d local processes; log %s", i, len(runs), run.name, study.steps,
                 study.nproc_per_node, logfile)
        started = time.time()
        with logfile.open("a") as sink:
            sink.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            sink.flush()
            # A session of its own: Ctrl-C reaches the study only, which turns it into the
            # SIGTERM after which train_ddp.py checkpoints (a SIGINT would not checkpoint).
            # If the study dies without passing anything on, the kernel sends that SIGTERM.
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_terminated_with_study())
            try:
                rc = proc.wait()
            except (Interrupted, KeyboardInterrupt):
                proc.send_signal(signal.SIGTERM)  # train_ddp.py checkpoints and exits
                proc.wait()
                raise
        if rc != 0 or not is_trained(run, study.steps):
            tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
            raise StudyError(f"{run.name}: training failed (exit {rc}); see {logfile}:\n{tail}")
        log.info("[%d/%d] %s: trained in %.0f s", i, len(runs), run.name, time.time() - started)


# ----------------------------------------------------------------------------- training, on SLURM

EVALUATION = "evaluate"  # the evaluation job's name in the study (its runs have their own names)
# Job states in which a job still holds its place: submitting its run again would start a second training.
_QUEUED_STATES = "PENDING,CONFIGURING,RUNNING,SUSPENDED,REQUEUED"
_REUSED = " (already queued, not submitted again)"


def _job_name(name: str) -> str:
    return f"study-{name}"


def _job_log(out: Path, name: str, job_id: str = "%j") -> Path:
    """A job's SLURM log; with the default ``%j``, the pattern its ``--output`` is given."""
    return out / "slurm" / f"{name}-{job_id}.out"


def _sbatch_job_id(stdout: str) -> str:
    job_id = stdout.strip().splitlines()[-1].split(";")[0] if stdout.strip() else ""
    if not job_id.isdigit():
        raise StudyError(f"sbatch did not print a job id: {stdout!r}")
    return job_id


def queued_jobs(out: Path, names: list[str]) -> dict[str, str]:
    """``{name: job id}`` of this study's jobs, among ``names``, that SLURM holds pending or running.

    A job is this study's when it has the name the study gives it (``study-<name>``) and its
    log in this study's ``slurm/`` folder: another study may have runs of the same names.
    squeue shows the ``--output`` pattern unexpanded (``%j``), pending or running. Where one
    run has several jobs (submitted twice before), the earliest is the one that counts.
    """
    r = subprocess.run(["squeue", "--me", "--noheader", f"--states={_QUEUED_STATES}",
                        f"--name={','.join(_job_name(n) for n in names)}", "--Format=JobID:|,Name:|,StdOut:"],
                       capture_output=True, text=True)
    if r.returncode:
        raise StudyError(f"squeue failed (exit {r.returncode}): {r.stderr.strip()}; nothing submitted, "
                         "since jobs of this study may be queued already")
    found: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        job_id, job_name, output = line.strip().split("|", 2)
        name = next((n for n in names if _job_name(n) == job_name and output == str(_job_log(out, n))), None)
        if name is not None:
            found.setdefault(name, []).append(job_id)
    for name, ids in found.items():
        ids.sort(key=int)
        if len(ids) > 1:
            log.warning("%s: jobs %s are all queued for it and only one can hold its run folder: scancel %s",
                        name, ", ".join(ids), " ".join(ids[1:]))
    return {name: ids[0] for name, ids in found.items()}


def _sbatch(what: str, cmd: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise StudyError(f"{what}: {Path(cmd[0]).name} failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return _sbatch_job_id(r.stdout)


def _launch_env(s: SlurmSettings) -> dict[str, str]:
    """launch.sh's settings, in its environment variables."""
    env = os.environ | {"NODES": str(s.nodes), "GPUS_PER_NODE": str(s.gpus_per_node),
                        "CPUS_PER_TASK": str(s.cpus_per_task), "TIME_LIMIT": s.time}
    env.setdefault("PYTHON", sys.executable)  # the jobs use the python that runs the study
    if s.nproc_per_node:
        env["NPROC_PER_NODE"] = str(s.nproc_per_node)
    return env


def _submit_training(study: StudyConfig, run: Run, env: dict[str, str]) -> str:
    cmd = [str(LAUNCH_SCRIPT), "--parsable", f"--output={_job_log(Path(study.out), run.name)}", *study.slurm.sbatch,
           str(run.config_file), f"run_dir={run.run_dir}"]
    return _sbatch(run.name, cmd, env | {"JOB_NAME": _job_name(run.name)})


def _submit_evaluation(study: StudyConfig, trainings: list[str], env: dict[str, str]) -> str:
    """The evaluation job, started once every job of ``trainings`` has succeeded."""
    s, out = study.slurm, Path(study.out)
    evaluate_cmd = [env["PYTHON"], "-m", "musicbert.study", "--config", str(out / "study.yaml"), "--evaluate-only"]
    cmd = ["sbatch", "--parsable", f"--job-name={_job_name(EVALUATION)}", f"--chdir={Path.cwd()}",
           f"--output={_job_log(out, EVALUATION)}", "--nodes=1", "--ntasks=1",
           f"--cpus-per-task={s.eval_cpus}", f"--time={s.eval_time}",
           f"--gres=gpu:{s.eval_gpus}" if s.eval_gpus else "--gres=none", *s.sbatch]
    if trainings:
        cmd += [f"--dependency=afterok:{':'.join(trainings)}", "--kill-on-invalid-dep=yes"]
    return _sbatch("the evaluation job", [*cmd, f"--wrap={shlex.join(evaluate_cmd)}"], env)


def submit_slurm(study: StudyConfig, runs: list[Run]) -> dict[str, str]:
    """One launch.sh job per unfinished run, then the evaluation job after all of them
    (``afterok``); returns ``{run name or "evaluate": job id}`` and prints where things go.

    Submitting again submits nothing twice: a run (or the evaluation) whose job SLURM still
    holds, pending or running, keeps that job (:func:`queued_jobs`). An evaluation job still
    queued is replaced (cancelled, submitted anew) when new training jobs were submitted,
    since it does not wait for them."""
    out = Path(study.out)
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    env = _launch_env(study.slurm)
    untrained = []
    for run in runs:
        if is_trained(run, study.steps):
            print(f"{run.name}: already trained ({run.final_checkpoint(study.steps)})")
        else:
            untrained.append(run)
    queued = queued_jobs(out, [run.name for run in untrained] + [EVALUATION])
    jobs: dict[str, str] = {}
    for run in untrained:
        jobs[run.name] = queued.get(run.name) or _submit_training(study, run, env)
        print(f"{run.name}: job {jobs[run.name]}{_REUSED if run.name in queued else ''} -> {run.run_dir} "
              f"(log {_job_log(out, run.name, jobs[run.name])})")

    trainings = list(jobs.values())
    submitted = [name for name in jobs if name not in queued]
    if EVALUATION in queued and submitted:
        stale = queued.pop(EVALUATION)
        subprocess.run(["scancel", stale], env=env, check=False)
        print(f"evaluation: queued job {stale} cancelled: it would not wait for the new jobs of {', '.join(submitted)}")
    jobs[EVALUATION] = queued.get(EVALUATION) or _submit_evaluation(study, trainings, env)
    after = f" after jobs {', '.join(trainings)} succeed" if trainings else ""
    print(f"evaluation: job {jobs[EVALUATION]}{_REUSED if EVALUATION in queued else ''}{after} "
          f"(log {_job_log(out, EVALUATION, jobs[EVALUATION])})")
    print(f"results: {out / 'results.json'}, {out / 'table.md'}, {out / 'figure.png'}")
    if trainings:
        print("A training job that fails cancels the evaluation job; run the study again to resume.")
    return jobs


# ----------------------------------------------------------------------------- evaluation


def _eval_stamp(study: StudyConfig, checkpoint: Path, random_init: bool) -> dict:
    """What an evaluation depends on; stored beside its metrics.json to tell whether it is current."""
    return {"checkpoint": str(checkpoint), "shards": study.shards, "random_init": random_init,
            "settings": {k: v for k, v in dataclasses.asdict(study.eval).items() if k not in ("device", "threads")}}


STAMP = "study_eval.json"


def _is_evaluated(folder: Path, stamp: dict) -> bool:
    try:
        json.loads((folder / "metrics.json").read_text())
        return json.loads((folder / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def evaluate_one(study: StudyConfig, name: str, checkpoint: Path, folder: Path, random_init: bool = False) -> dict:
    """Evaluate (unless already done with these settings) into ``folder``; return its metrics."""
    from musicbert.evaluate import evaluate, write_outputs

    stamp = _eval_stamp(study, checkpoint, random_init)
    if _is_evaluated(folder, stamp):
        log.info("%s: already evaluated (%s)", name, folder / "metrics.json")
        return json.loads((folder / "metrics.json").read_text())
    log.info("%s: evaluating %s%s", name, checkpoint, " (random-init)" if random_init else "")
    started = time.time()
    # An interrupted evaluation resumes from its journal (finished layers are not scored again).
    journal = folder.parent / f".{folder.name}.journal.json"
    metrics = evaluate(checkpoint, study.shards, out=None, random_init=random_init, journal=journal,
                       **study.eval.evaluate_kwargs())
    # Written whole or not at all: a temporary folder beside the final one, then renamed.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    write_outputs(metrics, tmp)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("%s: evaluated in %.0f s -> %s", name, time.time() - started, folder / "metrics.json")
    return metrics


def evaluate_all(study: StudyConfig, runs: list[Run]) -> dict[str, list[dict]]:
    """Every trained run and the random-init model; returns ``{model: [metrics per seed]}``."""
    missing = [r.name for r in runs if not is_trained(r, study.steps)]
    if missing:
        raise StudyError(f"not trained to step {study.steps} yet: {', '.join(missing)} (no {runs[0].final_checkpoint(study.steps).name} "
                         "in their run folders); run the study without --evaluate-only")
    if study.eval.threads:
        import torch

        torch.set_num_threads(study.eval.threads)
    results: dict[str, list[dict]] = {}
    for run in runs:
        metrics = evaluate_one(study, run.name, run.final_checkpoint(study.steps), run.eval_dir)
        results.setdefault(run.model, []).append(metrics)
    if study.eval.random_init:
        # The first run's configuration: every model has the same architecture unless the study
        # overrides model.* per model (dropout does not matter in eval mode).
        results[RANDOM_INIT] = [evaluate_one(study, RANDOM_INIT, runs[0].final_checkpoint(study.steps),
                                             Path(study.out) / "eval" / RANDOM_INIT, random_init=True)]
    return results


def write_report(study: StudyConfig, results: dict[str, list[dict]]) -> None:
    out = Path(study.out)
    agg = aggregate(results, seeds=study.seeds)
    agg["study"] = dataclasses.asdict(study)
    write_atomic(out / "results.json", json.dumps(agg, indent=1, allow_nan=False) + "\n")
    write_atomic(out / "table.md", markdown_table(agg))
    tmp = out / ".figure.tmp.png"
    plot_study(agg, tmp)
    os.replace(tmp, out / "figure.png")
    log.info("wrote %s, %s, %s", out / "results.json", out / "table.md", out / "figure.png")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musicbert.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="study file (configs/study.yaml, configs/study_demo.yaml)")
    p.add_argument("--slurm", action="store_true", help="submit one launch.sh job per run and an evaluation job after them")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate trained runs and write the report (what the SLURM evaluation job runs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study file, e.g. steps=100 seeds=[0,1] eval.repeats=2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[study %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        study = load_study(args.config, args.overrides)
        runs = write_study_files(study)
        if args.slurm:
            submit_slurm(study, runs)
            return 0
        signal.signal(signal.SIGTERM, _raise_interrupted)
        if not args.evaluate_only:
            train_local(study, runs)
        write_report(study, evaluate_all(study, runs))
    except (ConfigError, StudyError, ModelLoadError, InferenceError, ShardFormatError) as exc:  # ProbeError is an InferenceError
        print(f"musicbert.study: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("musicbert.study: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    out = Path(study.out)
    print(f"\n{(out / 'table.md').read_text()}\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'figure.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
