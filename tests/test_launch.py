"""launch.sh: SLURM submission, preemption, requeue and automatic resume.

Two kinds of test:
- Without SLURM (always run, seconds): launch.sh's submit and in-job halves with fake
  ``sbatch``, ``srun``, ``scontrol`` and ``scancel`` on PATH that record their arguments:
  the sbatch options (CPU mode, resizing, pass-through), the torchrun command per node, and
  the requeue decision after a USR1 (requeue; not when COMPLETE appeared or after SIGTERM).
- On a real SLURM (marker ``slurm``, ~2 min): ``scripts/slurm_local.sh`` installs
  slurm-wlm and munge with apt-get when missing and starts munged, slurmctld and two
  slurmd (two emulated nodes with fake GPUs, all on this machine) with state under a
  temporary folder. A run is submitted through launch.sh, preempted mid-run with
  ``scancel --batch --signal=USR1`` (what ``--signal=B:USR1@N`` sends before the time
  limit) and must be requeued once (Restarts=1), resume from its checkpoint and finish
  all its steps: once with a stand-in trainer in GPU mode (2 nodes x 1 fake GPU), once
  with the real train_ddp.py + configs/demo.yaml on CPU (2 nodes x 1 rank, gloo).
  Where SLURM cannot be installed or started (no root, no apt) these tests skip; under
  CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"
SLURM_LOCAL = REPO / "scripts" / "slurm_local.sh"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------- helpers

def _write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _clean_env() -> dict[str, str]:
    """The test's environment without variables that would change launch.sh's behaviour."""
    drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
    knobs = {"NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "TIME_LIMIT", "JOB_NAME", "SIGNAL_SECONDS",
             "MUSICBERT_CPU", "MUSICBERT_REPO", "RUN_DIR", "RUNS_ROOT", "NPROC_PER_NODE", "PYTHON",
             "TORCHRUN", "RDZV_HOST", "RDZV_PORT", "TRAIN_SCRIPT"}
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in knobs}


# --------------------------------------------------------------------------- without SLURM

@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """A PATH with sbatch/srun/scontrol/scancel stand-ins that log their argv to $FAKE_LOG.

    The fake srun sleeps $FAKE_SRUN_SECONDS (default 0), then writes $FAKE_COMPLETE if set
    and exits with $FAKE_SRUN_RC (default 0).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = 'printf \'%s\\n\' "$(basename "$0")" "$@" "--END--" >>"$FAKE_LOG"'
    for name in ("sbatch", "scancel"):
        _write_exe(bin_dir / name, f"#!/usr/bin/env bash\n{log}\n")
    _write_exe(bin_dir / "srun", f"""#!/usr/bin/env bash
{log}
sleep "${{FAKE_SRUN_SECONDS:-0}}"
[[ -n ${{FAKE_COMPLETE:-}} ]] && echo '{{"step": 7}}' >"$FAKE_COMPLETE"
exit "${{FAKE_SRUN_RC:-0}}"
""")
    _write_exe(bin_dir / "scontrol", f"""#!/usr/bin/env bash
# scontrol show hostnames 'node[01-02]' -> node01, node02
if [[ $1 == show && $2 == hostnames ]]; then echo node01; echo node02; exit 0; fi
{log}
""")
    (tmp_path / "train_ddp.py").write_text("# placeholder: the fake srun runs nothing\n")
    (tmp_path / "c.yaml").write_text("{}\n")
    env = _clean_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["FAKE_LOG"] = str(tmp_path / "calls.log")
    return env


def _calls(env: dict[str, str]) -> list[list[str]]:
    log = Path(env["FAKE_LOG"])
    if not log.exists():
        return []
    calls, cur = [], []
    for line in log.read_text().splitlines():
        if line == "--END--":
            calls.append(cur)
            cur = []
        else:
            cur.append(line)
    return calls


def test_launch_sh_is_valid_bash():
    for script in (LAUNCH, SLURM_LOCAL):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_submit_cpu_mode_and_overrides(fake_slurm, tmp_path):
    cfg = tmp_path / "c.yaml"
    env = fake_slurm | {"GPUS_PER_NODE": "0", "NODES": "3", "CPUS_PER_TASK": "4", "TIME_LIMIT": "0:10:00",
                        "JOB_NAME": "t", "SIGNAL_SECONDS": "90"}
    subprocess.run([str(LAUNCH), "--partition=p1", "--nodes=2", "c.yaml", "train.max_steps=5"],
                   env=env, cwd=tmp_path, check=True, timeout=30)
    (call,) = _calls(env)
    assert call[0] == "sbatch"
    args = call[1:]
    assert f"--chdir={REPO}" in args
    assert "--gres=none" in args  # CPU mode clears the #SBATCH GPU request
    for opt in ("--cpus-per-task=4", "--time=0:10:00", "--job-name=t", "--signal=B:USR1@90", "--partition=p1"):
        assert opt in args
    # An explicit sbatch option comes after the environment's, so it wins.
    assert args.index("--nodes=2") > args.index("--nodes=3")
    script = args.index(str(LAUNCH))
    assert args[script + 1:] == [str(cfg), "train.max_steps=5"]  # the config made absolute


def test_submit_gpu_mode(fake_slurm, tmp_path):
    env = fake_slurm | {"GPUS_PER_NODE": "4"}
    subprocess.run([str(LAUNCH), "c.yaml"], env=env, cwd=tmp_path, check=True, timeout=30)
    (call,) = _calls(env)
    assert "--gres=gpu:4" in call and "--gres=none" not in call


def test_submit_refuses_missing_config(fake_slurm, tmp_path):
    r = subprocess.run([str(LAUNCH), "nope.yaml"], env=fake_slurm, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "not found" in r.stderr
    assert _calls(fake_slurm) == []


def test_sbatch_defaults_in_script():
    head = LAUNCH.read_text()
    for directive in ("--nodes=", "--gres=gpu:", "--cpus-per-task=", "--time=", "--output=",
                      "--signal=B:USR1@", "--requeue", "--open-mode=append"):
        assert re.search(rf"^#SBATCH {re.escape(directive)}", head, re.M), directive


def _job_env(fake_slurm: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a 2-node batch job (job 4242, name mb) submitted from tmp_path."""
    return fake_slurm | {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mb", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_CPUS_PER_TASK": "6", "SLURM_SUBMIT_DIR": str(tmp_path),
        "PYTHON": "/opt/py/bin/python",
    } | extra


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_job_torchrun_command(fake_slurm, tmp_path, cpu):
    """In the job: one srun task per node, torchrun with c10d rendezvous on the first node."""
    run_dir = tmp_path / "runs" / "mb-4242"
    env = _job_env(fake_slurm, tmp_path, FAKE_COMPLETE=str(run_dir / "COMPLETE"))
    env |= {"MUSICBERT_CPU": "1"} if cpu else {"SLURM_GPUS_ON_NODE": "4"}
    r = subprocess.run([str(LAUNCH), "c.yaml", "train.max_steps=7"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    (srun,) = [c for c in _calls(env) if c[0] == "srun"]
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun and "--ntasks=2" in srun
    torchrun = srun[srun.index("/opt/py/bin/python"):]
    assert torchrun[:3] == ["/opt/py/bin/python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in torchrun
    assert f"--nproc_per_node={6 if cpu else 4}" in torchrun
    assert "--rdzv_backend=c10d" in torchrun
    assert f"--rdzv_endpoint=node01:{29500 + 4242 % 10000}" in torchrun
    script = torchrun.index("train_ddp.py")
    # RUN_DIR defaults to runs/<job name>-<job id>, relative to the submit directory.
    assert torchrun[script:] == ["train_ddp.py", "--config", "c.yaml", "run_dir=runs/mb-4242", "train.max_steps=7"]
    assert "run complete" in r.stdout
    assert not [c for c in _calls(env) if c[:2] == ["scontrol", "requeue"]]


def test_job_user_run_dir_wins(fake_slurm, tmp_path):
    mine = tmp_path / "mine"
    env = _job_env(fake_slurm, tmp_path, MUSICBERT_CPU="1", FAKE_COMPLETE=str(mine / "COMPLETE"))
    r = subprocess.run([str(LAUNCH), "c.yaml", f"run_dir={mine}"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    (srun,) = [c for c in _calls(env) if c[0] == "srun"]
    assert srun[-2:] == [f"run_dir={mine}", f"run_dir={mine}"]  # launch.sh's, then the user's (last wins)
    assert "run complete" in r.stdout


@pytest.mark.parametrize("outcome", ["preempted", "finished-anyway", "cancelled"])
def test_job_preemption_requeue_decision(fake_slurm, tmp_path, outcome):
    """USR1 -> URG to the steps (each node task turns it into SIGTERM for torchrun) ->
    requeue, unless the run wrote COMPLETE meanwhile or a SIGTERM (scancel) came too."""
    run_dir = tmp_path / "runs" / "mb-4242"
    env = _job_env(fake_slurm, tmp_path, MUSICBERT_CPU="1", FAKE_SRUN_SECONDS="2")
    if outcome == "finished-anyway":
        env["FAKE_COMPLETE"] = str(run_dir / "COMPLETE")
    proc = subprocess.Popen([str(LAUNCH), "c.yaml"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not [c for c in _calls(env) if c[0] == "srun"] and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        if outcome == "cancelled":
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    calls = _calls(env)
    assert ["scancel", "--signal=URG", "4242"] in calls, out
    requeued = ["scontrol", "requeue", "4242"] in calls
    assert requeued == (outcome == "preempted"), out
    assert proc.returncode == 0, out


# --------------------------------------------------------------------------- real SLURM

# The local cluster: two emulated nodes (one slurmd each on this machine), each with two
# fake GPUs (GRES without hardware), so that multi-node runs and the GPU options are real
# SLURM scheduling. Node names do not resolve: the rendezvous uses 127.0.0.1.
LOCAL_NODES = 2
LOCAL_FAKE_GPUS = 2


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@dataclass
class Slurm:
    state: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol -o show job`` as a dict ({} once the job is gone)."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if r.returncode:
            return {}
        return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)

    def diagnostics(self, *files: Path) -> str:
        out = []
        for f in (*files, self.state / "slurmctld.log", *sorted(self.state.glob("slurmd-*.log"))):
            if f.exists():
                out.append(f"----- {f} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-80:]))
        return "\n".join(out)


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        _unavailable("a local SLURM needs root (slurmd runs jobs as their users)")
    r = subprocess.run([str(SLURM_LOCAL), "install"], capture_output=True, text=True, timeout=900)
    if r.returncode:
        _unavailable(f"SLURM could not be installed: {r.stderr.strip()[-2000:]}")
    # Directly under /tmp: the munge user must be able to reach its socket folder.
    state = Path(tempfile.mkdtemp(prefix="musicbert-slurm-", dir="/tmp"))
    env = _clean_env() | {"SLURM_LOCAL_NODES": str(LOCAL_NODES), "SLURM_LOCAL_GPUS": str(LOCAL_FAKE_GPUS)}
    try:
        r = subprocess.run([str(SLURM_LOCAL), "start", str(state)], env=env, capture_output=True, text=True,
                           timeout=120)
        if r.returncode:
            pytest.fail(f"slurm_local.sh start failed:\n{r.stderr}\n{Slurm(state, {}).diagnostics()}")
        yield Slurm(state, _clean_env() | {"SLURM_CONF": str(state / "slurm.conf")})
    finally:
        subprocess.run([str(SLURM_LOCAL), "stop", str(state)], timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _wait(predicate, timeout: float, what: str, on_fail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{on_fail()}")


def _log_steps(log: Path) -> list[int]:
    """The "step" of every training record in log.jsonl (other kinds of record skipped)."""
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec.get("kind", "train") == "train":
            steps.append(rec["step"])
    return steps


# A stand-in for train_ddp.py with the same contract: gloo DDP under torchrun, a checkpoint
# per step in run_dir, resume from the newest one, exit 0 after a checkpoint on SIGTERM,
# run_dir/COMPLETE and log.jsonl ({"step": n}) at train.max_steps.
STAND_IN = '''
import argparse, json, os, signal, sys, time
from pathlib import Path
import torch
import torch.distributed as dist

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("overrides", nargs="*")
opts = dict(o.split("=", 1) for o in ap.parse_args().overrides)
run_dir = Path(opts["run_dir"])
max_steps = int(opts.get("train.max_steps", 20))
step_s = float(opts.get("standin.step_seconds", 0.3))
stop = False
def on_term(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
dist.init_process_group("gloo")
rank = dist.get_rank()
say = lambda msg: print(f"[rank {rank}] {msg}", flush=True)
run_dir.mkdir(parents=True, exist_ok=True)
ckpts = sorted(run_dir.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
step = torch.load(ckpts[-1])["step"] if ckpts else 0
say(f"resumed from step {step}" if ckpts else "starting from step 0")
say(f"world size {dist.get_world_size()}, SLURM_GPUS_ON_NODE={os.environ.get('SLURM_GPUS_ON_NODE')}")
def save(step):
    if rank == 0:
        torch.save({"step": step}, run_dir / "tmp.pt")
        os.replace(run_dir / "tmp.pt", run_dir / f"ckpt-{step}.pt")
    dist.barrier()
while step < max_steps:
    time.sleep(step_s)
    t = torch.ones(1)
    dist.all_reduce(t)
    step += 1
    if rank == 0:
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "world": int(t.item())}) + "\\n")
    save(step)
    flag = torch.tensor([float(stop)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and step < max_steps:
        say(f"SIGTERM: checkpoint at step {step}, exiting 0")
        sys.exit(0)
if rank == 0:
    (run_dir / "COMPLETE").write_text(f"{step}\\n")
say(f"finished {step} steps")
'''


def _submit(slurm: Slurm, tmp_path: Path, config: Path, overrides: list[str],
            extra_env: dict[str, str]) -> tuple[str, Path, Path]:
    """Submit through launch.sh; return (job id, run dir, SLURM output file)."""
    out = tmp_path / "slurm-%j.out"
    env = slurm.env | {
        "JOB_NAME": "launchtest",
        "RUNS_ROOT": str(tmp_path / "runs"),
        "TIME_LIMIT": "10:00",
        "PYTHON": sys.executable,
        "RDZV_HOST": "127.0.0.1",  # emulated node names do not resolve
    } | extra_env
    r = subprocess.run([str(LAUNCH), f"--output={out}", "--parsable", str(config), *overrides],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"launch.sh failed:\n{r.stdout}\n{r.stderr}"
    job_id = r.stdout.strip().split(";")[0]
    assert job_id.isdigit(), r.stdout
    return job_id, tmp_path / "runs" / f"launchtest-{job_id}", Path(str(out).replace("%j", job_id))


def _preempt_and_finish(slurm: Slurm, job_id: str, run_dir: Path, out: Path, max_steps: int,
                        preempt_after_step: int, start_timeout: float, finish_timeout: float) -> str:
    """Wait for a step, send the preemption signal, wait for the job to end; check requeue + finish."""
    log = run_dir / "log.jsonl"
    diag = lambda: slurm.diagnostics(out)  # noqa: E731
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    def reached_step():
        if max(_log_steps(log), default=0) >= preempt_after_step:
            return True
        if slurm.job(job_id).get("JobState") in ended:
            pytest.fail(f"job {job_id} ended before step {preempt_after_step}: {slurm.job(job_id)}\n{diag()}")
        return False

    try:
        _wait(reached_step, start_timeout, f"job {job_id} to reach step {preempt_after_step}", diag)
        assert not (run_dir / "COMPLETE").exists(), "finished before the preemption: make the run longer"
        # What --signal=B:USR1@N sends before the time limit, sent now.
        slurm.run("scancel", "--batch", "--signal=USR1", job_id)
        info = _wait(lambda: (j := slurm.job(job_id)) and j.get("JobState") in ended and j,
                     finish_timeout, f"job {job_id} to be requeued and finish", diag)
    except BaseException:
        slurm.run("scancel", job_id, check=False)
        raise
    text = out.read_text(errors="replace") if out.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info}\n{diag()}"
    assert info["Restarts"] == "1", f"{info}\n{diag()}"
    assert "preemption warning (USR1)" in text and f"requeueing job {job_id}" in text, diag()
    assert "restart 1 on" in text, diag()
    assert (run_dir / "COMPLETE").exists(), diag()
    assert max(_log_steps(log)) == max_steps, diag()
    return text


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_two_nodes_preempt_requeue_resume(slurm, tmp_path):
    """launch.sh alone (stand-in trainer): 2 nodes x 1 (fake) GPU, preempted, requeued, resumed, finished."""
    trainer = tmp_path / "stand_in_train.py"
    trainer.write_text(STAND_IN)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    max_steps = 25
    job_id, run_dir, out = _submit(slurm, tmp_path, config, [f"train.max_steps={max_steps}"],
                                   {"NODES": "2", "GPUS_PER_NODE": "1", "CPUS_PER_TASK": "1",
                                    "TRAIN_SCRIPT": str(trainer)})
    text = _preempt_and_finish(slurm, job_id, run_dir, out, max_steps, preempt_after_step=3,
                               start_timeout=60, finish_timeout=120)
    assert "--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:" in text
    assert text.count("world size 2, SLURM_GPUS_ON_NODE=1") == 4, text  # 2 ranks x 2 runs
    resumed = [int(m) for m in re.findall(r"resumed from step (\d+)", text)]
    assert len(resumed) == 2 and min(resumed) >= 3, text
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, max_steps + 1)), "steps lost or repeated"
    assert {r["world"] for r in records} == {2}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_real_trainer_preempt_requeue_resume(slurm, tmp_path):
    """The real train_ddp.py + configs/demo.yaml on 2 nodes x 1 CPU rank (gloo), shards from
    examples/midi: preempted mid-run, requeued, resumed from its checkpoint, finished."""
    for needed in ("train_ddp.py", "configs/demo.yaml", "preprocess/__main__.py"):
        if not (REPO / needed).exists():
            _unavailable(f"{needed} is missing")
    shards = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "preprocess", "--src", str(REPO / "examples" / "midi"),
                        "--out", str(shards), "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    max_steps = 24  # enough steps left after the signal that the run cannot finish first
    overrides = [f"data.shards={shards}", f"train.max_steps={max_steps}", "train.log_every=1",
                 # no periodic checkpoint: the one the run resumes from is the preemption's
                 "train.ckpt_every=1000", "train.val_every=1000", "train.val_batches=2", "probe.every=0"]
    job_id, run_dir, out = _submit(slurm, tmp_path, REPO / "configs" / "demo.yaml", overrides,
                                   {"NODES": "2", "GPUS_PER_NODE": "0", "CPUS_PER_TASK": "1"})
    text = _preempt_and_finish(slurm, job_id, run_dir, out, max_steps, preempt_after_step=3,
                               start_timeout=150, finish_timeout=200)
    assert "--nnodes=2 --nproc_per_node=1" in text
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert resumed and min(resumed) >= 3, f"no resume from step >= 3 in the log:\n{text[-5000:]}"
    assert sorted(set(_log_steps(run_dir / "log.jsonl"))) == list(range(1, max_steps + 1)), text[-5000:]
