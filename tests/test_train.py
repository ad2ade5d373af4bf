"""train_ddp.py end to end: torchrun, 2 ranks, gloo on CPU, a tiny model on the bundled songs.

What is checked (each run takes seconds; the whole file about 2 minutes on 2 cores):
- every mode trains for a few steps on 2 ranks;
- exact resume: the per-step losses of a run stopped by SIGTERM, resumed, killed with
  kill -9 after a checkpoint and resumed again equal those of one uninterrupted run
  (BERT-dropout, so dropout masks, i.e. the RNG states, must be restored too);
- a truncated newest checkpoint is reported and the previous one is used, and the run
  again reproduces the uninterrupted losses;
- a completed run started again exits 0 at once;
- two torchrun "nodes" (--nnodes=2, c10d rendezvous on 127.0.0.1) train together and
  see exactly the losses of the single-node run with the same world size;
- non-finite losses (lr = 1e30 destroys the weights after the first update) are skipped on
  all ranks and stop the run with a clear message and a non-zero exit;
- a world-size change on resume is refused with a message;
- the run folder (``test_*`` at the end): a second run on a busy folder is refused naming the
  holder and the first goes on unharmed; a folder whose checkpoints are all unreadable is
  refused and its history kept (``--start-over`` then starts at step 0); a checkpoint write
  on a full file system (a tmpfs, when the test may mount one) stops the run with one line
  naming the file, and the run resumes exactly from the checkpoint before; after kill -9 no
  line of log.jsonl is lost; an empty val split is reported once and logs nothing.
The loss falling on real data over a few hundred steps is shown by ``make demo``
(configs/demo.yaml), not here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from musicbert import checkpoint as ckpt

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train_ddp.py"
N = 4  # checkpoint interval; the reference run is 2N steps

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers


def tiny_config(tmp_path: Path, shards: Path, mode: str = "BERT-dropout", **extra: str) -> Path:
    """A config a few times smaller than configs/demo.yaml, written as a file that bases on it."""
    text = f"""
base: {REPO / 'configs' / 'demo.yaml'}
model: {{dim: 32, n_layers: 2, n_heads: 2, ff_dim: 64, rotary_dims: 8, dropout: 0.1}}
objective: {{mode: {mode}}}
data: {{shards: {shards}, max_tokens: 1024, row_len: 512, workers: 1}}
train: {{max_steps: {2 * N}, warmup_steps: 3, log_every: 1, val_every: {N}, val_batches: 2, ckpt_every: {N}, keep_checkpoints: 2}}
"""
    path = tmp_path / f"tiny-{mode}.yaml"
    path.write_text(text)
    return path


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def torchrun_cmd(config: Path, run_dir: Path, *overrides: str, nproc: int = 2, rdzv: list[str] | None = None) -> list[str]:
    launcher = rdzv or ["--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, str(TRAIN), "--config", str(config), f"run_dir={run_dir}", *overrides]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # own session: the test can signal or kill the whole torchrun tree at once
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def losses(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (loss, mlm_loss, nce_loss) from log.jsonl; each step must appear once."""
    out: dict[int, tuple[float, float, float]] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind", "train") == "train":
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = (rec["loss"], rec["mlm_loss"], rec["nce_loss"])
    return out


def log_lines(run_dir: Path, name: str = "log.jsonl") -> list[str]:
    path = run_dir / name
    return path.read_text().splitlines() if path.exists() else []


def logged_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step_*.pt.sha256"))


def children(pid: int) -> list[int]:
    kids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(c) for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    out = []
    for kid in children(pid):
        out += [kid, *descendants(kid)]
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 torchrun and every process under it (its workers run in sessions of their own)."""
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "training ended before the test could interrupt it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def assert_same_losses(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), f"step {step}: {got[step]} != {ref[step]}"


@pytest.fixture(scope="module")
def shards(example_shards) -> Path:
    return example_shards


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> tuple[Path, Path, dict]:
    """One uninterrupted 2N-step BERT-dropout run on 2 ranks: (config, run_dir, losses)."""
    tmp = tmp_path_factory.mktemp("ref")
    config = tiny_config(tmp, shards)
    run_dir = tmp / "run"
    r = run(torchrun_cmd(config, run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((run_dir / "COMPLETE").read_text())["step"] == 2 * N
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, 2 * N + 1))
    return config, run_dir, ref


# ----------------------------------------------------------------------------- tests


def test_reference_run_outputs(reference):
    config, run_dir, ref = reference
    assert ckpt_steps(run_dir) == [N, 2 * N]  # keep_checkpoints 2
    assert all(v == v for v in sum(ref.values(), ())), "NaN in the reference run"
    kinds = [json.loads(line).get("kind", "train") for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds.count("val") == 2  # at N and 2N
    rec = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    for key in ("step", "loss", "mlm_loss", "nce_loss", "lr", "grad_norm", "mlm_acc", "nce_acc", "tokens_per_s", "samples_per_s"):
        assert key in rec
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # the checkpoint holds what the issue asks for and loads with weights_only=True
    import torch

    state = torch.load(run_dir / "checkpoints" / f"step_{2 * N:08d}.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["data"]) == 2
    assert set(state["rng"][0]) >= {"torch", "numpy", "python"}
    assert state["config"]["objective"]["mode"] == "BERT-dropout"
    # the ranks' dropout RNGs differ (else both ranks would drop the same units)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_completed_run_exits_at_once(reference):
    config, run_dir, _ = reference
    before = (run_dir / "log.jsonl").read_text()
    r = run([sys.executable, str(TRAIN), "--config", str(config), f"run_dir={run_dir}"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "complete" in r.stderr
    assert (run_dir / "log.jsonl").read_text() == before


def test_sigterm_then_kill9_resume_exactly(reference, tmp_path):
    config, _, ref = reference
    run_dir = tmp_path / "run"
    # 1. SIGTERM to one worker (rank 1) while training: all ranks stop at the next step,
    #    checkpoint and exit 0.
    proc = start(torchrun_cmd(config, run_dir, "train.max_steps=1000"), tmp_path / "1.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 1, proc)
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGTERM)  # one worker only (the younger: rank 1)
        assert proc.wait(timeout=60) == 0, (tmp_path / "1.log").read_text()
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    stopped = ckpt_steps(run_dir)
    assert stopped and stopped[-1] < N, "the run should stop before its first regular checkpoint"
    assert not (run_dir / "COMPLETE").exists()
    assert "stop signal" in (tmp_path / "1.log").read_text()
    # 2. resume; kill -9 the whole job right after the checkpoint at step N.
    proc = start(torchrun_cmd(config, run_dir, "train.max_steps=1000"), tmp_path / "2.log")
    try:
        wait_for(lambda: N in ckpt_steps(run_dir), proc)
    finally:
        kill_tree(proc)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped[-1]:08d}.pt'}" in (tmp_path / "2.log").read_text()
    before_kill = log_lines(run_dir)
    # 3. resume again and finish: every step's losses equal the uninterrupted run's, and every
    #    line written before the kill is still there (the steps after the checkpoint, replayed
    #    now, moved to log.rewound.jsonl).
    r = run(torchrun_cmd(config, run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_losses(losses(run_dir), ref)
    kept, aside = log_lines(run_dir), log_lines(run_dir, "log.rewound.jsonl")
    assert kept[: len(before_kill)] == [line for line in before_kill if json.loads(line)["step"] <= N]
    assert all(line in kept or line in aside for line in before_kill)


def test_truncated_newest_checkpoint_falls_back(reference, tmp_path):
    config, ref_dir, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "COMPLETE").unlink()
    newest = run_dir / "checkpoints" / f"step_{2 * N:08d}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    r = run(torchrun_cmd(config, run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{newest}" in r.stderr and "checksum mismatch" in r.stderr  # names the file and why
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{N:08d}.pt'}" in r.stderr
    assert_same_losses(losses(run_dir), ref)
    assert (run_dir / "checkpoints" / f"step_{2 * N:08d}.pt.corrupt").exists()


def test_two_node_rendezvous(reference, tmp_path):
    config, _, ref = reference
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    procs = [
        start(
            torchrun_cmd(
                config, run_dir, f"train.max_steps={N}",
                rdzv=["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test2node"],
            ),
            tmp_path / f"node{rank}.log",
        )
        for rank in (0, 1)
    ]
    try:
        for rank, p in enumerate(procs):
            assert p.wait(timeout=120) == 0, (tmp_path / f"node{rank}.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    got = losses(run_dir)
    assert_same_losses(got, {s: ref[s] for s in range(1, N + 1)})


def test_world_size_change_is_refused(reference, tmp_path):
    config, ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "COMPLETE").unlink()
    r = run([sys.executable, str(TRAIN), "--config", str(config), f"run_dir={run_dir}", f"train.max_steps={3 * N}"], timeout=60)
    assert r.returncode != 0
    assert "written by 2 ranks, this run has 1" in r.stderr


@pytest.mark.parametrize("mode", ["BERT", "BERT-aug", "BERT-neighbor"])
def test_modes_train(shards, tmp_path, mode):
    # (BERT-dropout is the reference run above.) BERT-aug also runs the in-training probes.
    config = tiny_config(tmp_path, shards, mode=mode)
    run_dir = tmp_path / "run"
    probe = ["probe.every=3", "probe.max_songs=4", "probe.projector_bars=20", "probe.layers=all"] if mode == "BERT-aug" else []
    r = run(torchrun_cmd(config, run_dir, "train.max_steps=3", "train.val_every=3", *probe))
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3]
    for loss, mlm, nce in got.values():
        assert 0 < mlm < 10 and loss == loss
        assert (nce == 0.0) == (mode == "BERT")
    if probe:
        (rec,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"probe"' in line]
        assert rec["step"] == 3 and "probe_chords/layer_02" in rec and "probe_tempo/layer_01" in rec
        assert list((run_dir / "tb").rglob("projector_config.pbtxt")), "no bar embeddings for the projector"


def test_stop_signals_only_set_a_flag(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import train_ddp

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        train_ddp.stop_signals.install()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            train_ddp.stop_signals.received = None
            os.kill(os.getpid(), sig)
            assert train_ddp.stop_signals.received == sig
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        train_ddp.stop_signals.received = None


@pytest.mark.parametrize("native_bf16", [True, False])
def test_precision_auto_on_cuda(monkeypatch, native_bf16):
    """bf16 where the GPU has it, else fp16 + GradScaler (not the bf16 emulation of a V100/T4)."""
    monkeypatch.syspath_prepend(str(REPO))
    import torch
    import train_ddp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation)
    expected = ("bf16", torch.bfloat16, False) if native_bf16 else ("fp16", torch.float16, True)
    assert train_ddp.autocast_settings("auto", torch.device("cuda", 0)) == expected
    assert train_ddp.autocast_settings("auto", torch.device("cpu")) == ("fp32", None, False)


@pytest.mark.parametrize(("device", "precision"), [("cpu", "bf16"), ("cuda", "fp32")])
def test_varlen_where_it_cannot_run_is_a_config_error(monkeypatch, tmp_path, device, precision):
    """Refused before the model is built (exit 2 with one line), not by a RuntimeError in the first forward."""
    monkeypatch.syspath_prepend(str(REPO))
    import torch
    import train_ddp

    from musicbert.config import ConfigError, load_config
    from musicbert.distributed import DistInfo

    cfg = load_config(tiny_config(tmp_path, tmp_path), ["train.attention=varlen", f"train.precision={precision}"])
    info = DistInfo(0, 0, 1, torch.device(device, 0) if device == "cuda" else torch.device(device), "gloo")
    with pytest.raises(ConfigError, match=f"train.attention varlen needs a CUDA GPU.*not {device} with {precision}"):
        train_ddp.build_training(cfg, info)


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    import torch
    import torch.distributed as dist

    from musicbert import distributed as dist_utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("set_device on a GPU that is not there"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 1, but this node has 1 visible CUDA device\(s\).*--nproc_per_node"):
        dist_utils.setup()
    assert not dist.is_initialized()


def test_nonfinite_losses_are_skipped_then_stop(shards, tmp_path):
    config = tiny_config(tmp_path, shards, mode="BERT-neighbor")
    run_dir = tmp_path / "run"
    r = run(torchrun_cmd(config, run_dir, "train.lr=1.0e+30", "train.warmup_steps=1", "train.max_bad_steps=2", "train.max_steps=20"))
    assert r.returncode != 0
    assert "consecutive steps with a non-finite loss" in r.stderr, r.stderr
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[0]["skipped_steps"] == 0  # the first step is finite and applied
    assert log[-1]["skipped_steps"] == 3  # then 3 skipped in a row (> max_bad_steps = 2): stop
    assert not (run_dir / "COMPLETE").exists()


def test_missing_shards_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-shards"
    config = REPO / "configs" / "demo.yaml"
    r = run([sys.executable, str(TRAIN), "--config", str(config), f"run_dir={tmp_path / 'run'}", f"data.shards={missing}"], timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{missing}/manifest.json: not found" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the run folder


def test_second_run_on_a_busy_folder_is_refused(reference, tmp_path):
    config, _, ref = reference
    run_dir = tmp_path / "run"
    first = start(torchrun_cmd(config, run_dir, "train.max_steps=1000"), tmp_path / "first.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 1, first)
        holder = [pid for pid in children(first.pid) if "train_ddp.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        assert len(holder) == 2, holder  # the two ranks
        # the same command (2 ranks) and a single process: both refused, naming the holder
        second = run(torchrun_cmd(config, run_dir, "train.max_steps=1000"))
        alone = run([sys.executable, str(TRAIN), "--config", str(config), f"run_dir={run_dir}"], timeout=60)
        assert first.poll() is None, "the first run must go on"
        for pid in holder:
            os.kill(pid, signal.SIGTERM)
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert second.returncode != 0 and alone.returncode == 3, second.stderr + alone.stderr
    for r in (second, alone):
        refusals = [line for line in r.stderr.splitlines() if "is in use by another run" in line]
        assert len(refusals) == 1, r.stderr  # one line, from rank 0 only; the other rank stopped quietly
        assert f"{run_dir} is in use by another run (pid {min(holder)} on {socket.gethostname()}" in refusals[0]
        assert "train_ddp.py\", line" not in r.stderr  # no traceback from train_ddp.py (torchrun prints its own)
    # the first run is unharmed: it alone wrote the folder, every step once, the reference losses
    got = losses(run_dir)
    assert sorted(got) == list(range(1, len(got) + 1))
    assert_same_losses({k: v for k, v in got.items() if k <= 2 * N}, {k: v for k, v in ref.items() if k <= len(got)})
    assert not (run_dir / "log.rewound.jsonl").exists() and "resumed" not in (tmp_path / "first.log").read_text()


def test_unreadable_checkpoints_are_refused_history_kept(reference, tmp_path):
    config, ref_dir, ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "COMPLETE").unlink()
    paths = [p for _, p in ckpt.list_checkpoints(run_dir)]
    paths[0].write_text("not a checkpoint\n")
    paths[0].with_name(paths[0].name + ".sha256").unlink()
    paths[1].write_bytes(paths[1].read_bytes()[:1000])
    history = log_lines(run_dir)
    r = run(torchrun_cmd(config, run_dir))
    assert r.returncode != 0
    assert "none of its 2 checkpoints can be read" in r.stderr and "--start-over" in r.stderr, r.stderr
    assert f"{paths[0]}: not a checkpoint" in r.stderr and f"{paths[1]}: checksum mismatch" in r.stderr
    assert log_lines(run_dir) == history and [p for _, p in ckpt.list_checkpoints(run_dir)] == paths  # nothing touched
    # starting over is explicit; the old history is kept aside
    r = run(torchrun_cmd(config, run_dir, "--start-over", "train.max_steps=2"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(p.with_name(p.name + ".corrupt").exists() for p in paths)
    assert log_lines(run_dir, "log.rewound.jsonl")[1:] == history
    assert_same_losses(losses(run_dir), {k: ref[k] for k in (1, 2)})


def test_full_disk_during_a_checkpoint(reference, tmp_path):
    config, ref_dir, ref = reference
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (the ENOSPC path is unit-tested in test_checkpoint.py)")
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (ref_dir / "checkpoints" / f"step_{N:08d}.pt").stat().st_size
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={4 * size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run_dir = disk / "run"
        shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns(f"step_{2 * N:08d}.pt*", "COMPLETE", "tb"))
        # fill the disk but half a checkpoint (log lines still fit)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - size // 2))
        r = run(torchrun_cmd(config, run_dir))
        assert r.returncode != 0
        newest = run_dir / "checkpoints" / f"step_{2 * N:08d}.pt"
        errors = [line for line in r.stderr.splitlines() if "No space left on device" in line]
        assert len(errors) == 1 and f"{newest}: No space left on device (ENOSPC)" in errors[0], r.stderr
        assert "unexpected pos" not in r.stderr and "inline_container" not in r.stderr
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{N:08d}.pt", f"step_{N:08d}.pt.sha256"]
        assert ckpt.load_checkpoint(run_dir / "checkpoints" / f"step_{N:08d}.pt")["step"] == N
        # space again: the run resumes from step N and ends as the uninterrupted one did
        (disk / "filler").unlink()
        r = run(torchrun_cmd(config, run_dir))
        assert r.returncode == 0, r.stdout + r.stderr
        assert_same_losses(losses(run_dir), ref)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_empty_val_split_logs_nothing(shards, tmp_path):
    no_val = tmp_path / "shards"
    shutil.copytree(shards, no_val)
    manifest = json.loads((no_val / "manifest.json").read_text())
    for name in manifest["splits"]["val"]["shards"]:
        (no_val / name).unlink()
    manifest["splits"]["val"] = {"songs": 0, "bars": 0, "tokens": 0, "shards": []}
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    config = tiny_config(tmp_path, no_val, mode="BERT")
    run_dir = tmp_path / "run"
    r = run([sys.executable, str(TRAIN), "--config", str(config), f"run_dir={run_dir}", "train.max_steps=3", "train.val_every=1"], timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("has no data: validation is skipped") == 1, r.stderr  # said once, not at every validation
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert not [line for line in log_lines(run_dir) if '"val"' in line]
