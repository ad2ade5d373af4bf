"""The GPU path in one command: correctness, speed and exact resume on one CUDA GPU in under 8 minutes.

Run (one GPU; about 4-6 minutes, each phase capped by its time budget, 7.7 minutes at most)::

    python bench/gpu.py                       # writes runs/bench/gpu.json, last line RESULT ...
    python bench/gpu.py --dry-run             # the same on CPU with a tiny model (~1 minute)

Phases (a phase that fails or runs out of time records its error in the JSON; the next runs; the JSON
is rewritten after every phase, so a run killed from outside leaves the phases it finished):

1. ``correctness``: every attention layout (``bars``, ``rows``, ``varlen``; see
   :mod:`musicbert.attention`) against plain math attention (the ``rows`` layout under SDPA's MATH
   backend, fp32, TF32 off) on one packed batch of real bars, with the widths of the timed
   model and 2 layers, dropout 0: the hidden states of real tokens, the MLM logits, the bar
   states, and the gradient of every parameter (loss = MLM cross-entropy + mean squared last-layer
   bar state). Error = ``||x - ref|| / ||ref||`` (for gradients over all parameters together,
   and the worst single parameter). Tolerances: fp32 ``1e-4``; bf16 ``3e-2`` (values) and ``5e-2``
   (gradients), or 1.5x the error of the math backend itself run in bf16, whichever is larger
   (the bf16 floor, reported as ``floor``). ``varlen`` (flash) runs in bf16 only.
2. ``speed``: training steps of BERT-base (768 dim, 12 layers, 12 heads, ff 3072, dropout 0) in
   bf16 autocast, as ``bench/train.py`` takes them (its batches, step and model builders): real
   (non-padding) tokens/s, MFU = :func:`musicbert.model.training_flops` per second over the
   device's dense bf16 peak (:func:`musicbert.monitor.peak_flops`; the training loop's ``mfu``
   uses the same two), peak memory allocated; for each layout, ``varlen`` with every block
   ``torch.compile``-d (``--no-compile`` to skip), and HF ``BertForMaskedLM`` (SDPA) on the same
   bars one per row, padded.
3. ``resume``: ``train_ddp.py`` under ``torchrun --nproc_per_node=1`` (nccl on GPU, gloo on CPU)
   for ``--resume-steps`` steps in bf16 and in fp16 + GradScaler (bf16 only on CPU), BERT-base
   widths; per precision an uninterrupted run and, at the same time, a run that gets SIGTERM after
   a third of the steps (it checkpoints and exits 0) and is then resumed. The resumed run's
   per-step losses must equal the uninterrupted run's (``exact``; ``max_rel_diff`` otherwise, pass
   below ``1e-3``: GPU kernels with atomic adds need not be bitwise reproducible), and the loss must
   fall (mean of the last quarter of the steps below that of the first quarter).
4. one ``RESULT key=value ...`` line on stdout, and the JSON file (``--out``) with everything.

``--dry-run`` (automatic without CUDA): a tiny model (dim 64, 2 layers), fewer and smaller
batches, gloo, no ``torch.compile``; bf16 autocast on CPU in phases 1 and 3, fp32 in phase 2 (CPUs
without bf16 units emulate it, slowly); everything but the CUDA kernels runs.
Bars: shards of ``examples/midi`` (made once, as ``bench/train.py`` does) or ``--shards``;
synthetic bars only when the preprocessor cannot run (said loudly, and in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import train as train_bench  # bench/train.py: batches, model builders, steps

from musicbert.attention import varlen_usable
from musicbert.batch import Batch
from musicbert.config import ModelConfig
from musicbert.model import MusicBERT
from musicbert.monitor import peak_flops as device_peak_flops
from musicbert.objectives import PretrainingLoss
from musicbert.vocab import VOCAB

PHASES = ("data", "correctness", "speed", "resume")
LAYOUTS = ("bars", "rows", "varlen")
#: fp32 and bf16 tolerances of phase 1 (relative error norms; see the module docstring).
TOLERANCE = {"fp32": {"values": 1e-4, "grads": 1e-4}, "bf16": {"values": 3e-2, "grads": 5e-2}}
BF16_FLOOR_FACTOR = 1.5
RESUME_MAX_REL_DIFF = 1e-3


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run (GPU or dry run)."""

    dry_run: bool
    size: str  # a key of bench/train.py's SIZES
    max_tokens: int  # room per packed batch
    row_len: int
    distinct: int  # distinct batches, cycled through
    warmup: int  # untimed steps per variant
    steps: int  # timed steps per variant
    resume_steps: int
    budgets: dict  # phase -> seconds


def make_plan(dry_run: bool, args: argparse.Namespace) -> Plan:
    if dry_run:
        return Plan(True, "tiny", 1024, 512, 2, 1, 2, args.resume_steps or 12,
                    {"data": 120, "correctness": 120, "speed": 120, "resume": 300})  # fmt: skip  (a busy CPU is slow)
    return Plan(False, "base", 12288, 1024, 4, 3, args.steps, args.resume_steps or 30,
                {"data": 45, "correctness": 60, "speed": 170, "resume": 165})  # fmt: skip


class PhaseTimeout(Exception):
    """A phase ran past its time budget."""


def _on_alarm(_signum, _frame):
    raise PhaseTimeout("time budget spent")


def run_phase(name: str, budget_s: float, fn, *args) -> dict:
    """``fn(deadline, *args)`` under a hard time budget (SIGALRM); its dict, or its error."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + budget_s
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s + 5)  # fn checks the deadline itself; this is the backstop
    try:
        out = fn(deadline, *args)
    except Exception as exc:  # noqa: BLE001 - a failed phase is recorded and the next one runs
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    out.update(seconds=round(time.perf_counter() - t0, 1), budget_s=budget_s)
    print(f"[{name}] {'ok' if out.get('ok') else 'FAILED: ' + str(out.get('error', 'see JSON'))} ({out['seconds']} s)", flush=True)
    return out


def left(deadline: float) -> float:
    return deadline - time.monotonic()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- phase 1: correctness


def forward_backward(model: MusicBERT, batch: Batch, dtype: torch.dtype | None) -> tuple[dict, dict]:
    """Outputs on real tokens and every parameter's gradient, in fp32 copies."""
    model.zero_grad(set_to_none=True)
    with autocast(batch.tokens.device, dtype):
        out = model.forward_batch(batch)
        loss = F.cross_entropy(out.mlm_logits.float(), batch.mlm_targets) + out.bar_states[-1].float().square().mean()
    loss.backward()
    values = {"hidden": out.hidden[batch.segments > 0], "mlm_logits": out.mlm_logits, "bar_states": out.bar_states}
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float() for k, v in values.items()}, grads


def compare(got: tuple[dict, dict], ref: tuple[dict, dict]) -> dict:
    values = {k: rel_err(got[0][k], ref[0][k]) for k in ref[0]}
    names = sorted(ref[1])
    per_param = {n: rel_err(got[1][n], ref[1][n]) for n in names}
    worst = max(per_param, key=per_param.get)
    flat = rel_err(torch.cat([got[1][n].reshape(-1) for n in names]), torch.cat([ref[1][n].reshape(-1) for n in names]))
    return {"values": values, "grads": flat, "worst_param": worst, "worst_param_err": per_param[worst]}


def check_layouts(deadline: float, plan: Plan, device: torch.device, batch: Batch) -> dict:
    batch = batch.to(device)  # here, not before the phase: a failing first CUDA call is then this phase's error
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = ModelConfig(vocab_size=len(VOCAB), max_len=512, dropout=0.0, **{**train_bench.SIZES[plan.size], "n_layers": 2})
    torch.manual_seed(0)
    model = MusicBERT(cfg, attention="rows").to(device).train()
    with sdpa_kernel(SDPBackend.MATH):
        ref = forward_backward(model, batch, None)
        floor = compare(forward_backward(model, batch, torch.bfloat16), ref)
    checks, ok = [], True
    for layout in LAYOUTS:
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            entry = {"layout": layout, "precision": precision}
            if layout == "varlen" and not varlen_usable(device, dtype or torch.float32):
                entry["skipped"] = f"the flash kernel does not run on {device.type} in {precision}"
                checks.append(entry)
                continue
            if left(deadline) < 2:
                entry["skipped"] = "time budget spent"
                checks.append(entry)
                ok = False
                continue
            model.attention = layout
            try:
                with autocast(device, dtype):
                    entry["used_layout"] = model.layout_for(device)
                entry |= compare(forward_backward(model, batch, dtype), ref)
            except Exception as exc:  # noqa: BLE001 - one layout failing must not hide the others
                entry |= {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
                print(f"  {layout:>6} {precision}: FAILED {entry['error']}", flush=True)
                ok = False
                checks.append(entry)
                continue
            tol = TOLERANCE[precision]
            if precision == "bf16":
                tol = {"values": max(tol["values"], BF16_FLOOR_FACTOR * max(floor["values"].values())),
                       "grads": max(tol["grads"], BF16_FLOOR_FACTOR * floor["grads"])}  # fmt: skip
            entry["tolerance"] = tol
            entry["ok"] = (entry["used_layout"] == layout and max(entry["values"].values()) <= tol["values"]
                           and entry["grads"] <= tol["grads"])  # fmt: skip
            ok &= entry["ok"]
            checks.append(entry)
            print(f"  {layout:>6} {precision}: values {max(entry['values'].values()):.2e}, grads {entry['grads']:.2e} "
                  f"(worst {entry['worst_param']} {entry['worst_param_err']:.2e}) -> {'ok' if entry['ok'] else 'FAIL'}", flush=True)
    ran = [c for c in checks if "ok" in c]
    return {"ok": ok and bool(ran), "model": {**train_bench.SIZES[plan.size], "n_layers": 2},
            "batch": {"rows": int(batch.tokens.shape[0]), "row_len": int(batch.tokens.shape[1]), "bars": batch.n_bars,
                      "real_tokens": batch.n_real_tokens, "masked": int(batch.mlm_targets.numel())},
            "reference": "rows layout, SDPA MATH backend, fp32, TF32 off", "bf16_floor": floor,
            "tolerances": TOLERANCE, "bf16_floor_factor": BF16_FLOOR_FACTOR, "checks": checks}  # fmt: skip


# --------------------------------------------------------------------------- phase 2: speed


def time_steps(deadline: float, plan: Plan, device: torch.device, step, tokens: list[int], flops: list[float]) -> dict:
    """Warm-up steps, then timed steps cycling through the batches: throughput, MFU and peak memory."""
    n = len(tokens)
    for i in range(plan.warmup):
        step(i % n)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, t0 = 0, time.perf_counter()
    while done < plan.steps and left(deadline) > 0:
        step(done % n)
        done += 1
    sync(device)
    dt = time.perf_counter() - t0
    if done == 0:
        raise PhaseTimeout("no timed step fitted in the time budget")
    useful = sum(flops[k % n] for k in range(done)) / dt
    peak = device_peak_flops(device)
    return {
        "steps": done,
        "real_tokens_per_s": sum(tokens[k % n] for k in range(done)) / dt,
        "step_ms": 1000 * dt / done,
        "useful_tflops": useful / 1e12,
        "mfu": useful / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def measure_speed(deadline: float, plan: Plan, device: torch.device, batches: list[Batch], compile_blocks: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    loss_fn = PretrainingLoss(train_bench.OBJECTIVE)
    padded = [train_bench.padded_same_steps(b) for b in batches]
    tokens = [b.n_real_tokens for b in batches]
    flops = [train_bench.useful_flops(plan.size, p) for p in padded]
    packed_dev = [b.to(device) for b in batches]
    padded_dev = [p.to(device) for p in padded]

    dtype = torch.bfloat16 if device.type == "cuda" else None  # CPUs without bf16 units emulate it slowly

    def amp():
        return autocast(device, dtype)

    def ours(layout: str, compiled: bool):
        if layout == "varlen" and not varlen_usable(device, dtype or torch.float32):
            return None
        return lambda: _build(plan, device, layout, compiled), lambda m, o, i: train_bench.step_ours(m, o, packed_dev[i], loss_fn, amp)

    hf = (lambda: train_bench.build_hf(plan.size, 0.0, device), lambda m, o, i: train_bench.step_hf(m, o, padded_dev[i], amp))
    if importlib.util.find_spec("transformers") is None:
        hf = None
    # The compiled variant goes last: compiling may take long, and it must not starve the others.
    variants = {layout: ours(layout, False) for layout in LAYOUTS} | {"hf": hf}
    if compile_blocks:
        variants["varlen+compile"] = ours("varlen", True)
    results, ok = {}, True
    for name, variant in variants.items():
        if variant is None:
            results[name] = {"skipped": "transformers is not installed (pip install -e '.[bench]')" if name == "hf"
                             else f"the flash kernel does not run on {device.type}"}  # fmt: skip
            continue
        results[name] = _one_variant(deadline, plan, device, name, *variant, tokens, flops)
        ok &= "error" not in results[name] or name == "varlen+compile"  # compiling is an option, not a requirement
    timed = {k: v for k, v in results.items() if "real_tokens_per_s" in v and k != "hf"}

    best = max(timed, key=lambda k: timed[k]["real_tokens_per_s"]) if timed else None
    return {
        "ok": ok and best is not None,
        "size": train_bench.SIZES[plan.size],
        "precision": "bf16 autocast" if dtype else "fp32",
        "batches": {"distinct": len(batches), "max_tokens": plan.max_tokens, "row_len": plan.row_len,
                    "mean_real_tokens": sum(tokens) / len(tokens), "mean_bars": sum(b.n_bars for b in batches) / len(batches)},
        "peak_flops": device_peak_flops(device),
        "mfu_formula": "musicbert.model.training_flops (as the training loop's mfu) / musicbert.monitor.peak_flops",
        "auto_layout": "varlen" if varlen_usable(device, torch.bfloat16) else "bars",
        "variants": results,
        "best": best,
        "ratio_best_vs_hf": (timed[best]["real_tokens_per_s"] / results["hf"]["real_tokens_per_s"]
                             if best and "real_tokens_per_s" in results["hf"] else None),
    }  # fmt: skip


def _build(plan: Plan, device: torch.device, layout: str, compiled: bool):
    model, opt = train_bench.build_ours(plan.size, 0.0, device, layout)
    if compiled:
        for block in model.blocks:
            block.compile(dynamic=True)
    return model, opt


def _one_variant(deadline, plan, device, name, build, step, tokens, flops) -> dict:
    if left(deadline) < 5:
        return {"skipped": "time budget spent"}
    model = opt = None
    try:
        t0 = time.perf_counter()
        model, opt = build()
        model.train()
        out = time_steps(deadline, plan, device, lambda i: step(model, opt, i), tokens, flops)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        mfu = f", MFU {100 * out['mfu']:.1f}%" if out["mfu"] is not None else ""
        mem = f", peak {out['peak_memory_gib']:.2f} GiB" if out["peak_memory_gib"] is not None else ""
        print(f"  {name:>15}: {out['real_tokens_per_s']:>10,.0f} real tokens/s, {out['step_ms']:.1f} ms/step{mfu}{mem}", flush=True)
        return out
    except Exception as exc:  # noqa: BLE001 - one variant failing (or the budget's alarm) must not hide the others
        print(f"  {name:>15}: FAILED {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    finally:
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- phase 3: resume


def resume_config(plan: Plan, shards: str, work: Path) -> Path:
    """A config file for the resume runs: BERT-dropout (so the RNG states must be restored too)."""
    config = {
        "base": str(REPO / "configs" / "base.yaml"),
        "model": {**train_bench.SIZES[plan.size], "max_len": 512, "dropout": 0.1},
        "objective": {"mode": "BERT-dropout"},
        "data": {"shards": shards, "max_tokens": plan.max_tokens, "row_len": plan.row_len, "workers": 1, "shuffle_buffer": 16},
        "train": {"max_steps": plan.resume_steps, "lr": 2e-3 if plan.dry_run else 3e-4, "warmup_steps": 5, "log_every": 1,
                  "val_every": plan.resume_steps, "val_batches": 2, "ckpt_every": 100_000, "keep_checkpoints": 2},
    }  # fmt: skip
    path = work / "resume.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, each before its children, from the parent ids in ``/proc/*/stat``
    (``/proc/PID/task/TID/children`` needs a kernel option that a VM's kernel may lack)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            ppid = int(text[text.rindex(")") + 2 :].split()[1])  # "pid (comm) state ppid ..."
            kids.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], sorted(kids.get(pid, []), reverse=True)
    while todo:
        kid = todo.pop()
        out.append(kid)
        todo += sorted(kids.get(kid, []), reverse=True)
    return out


class Launch:
    """One ``torchrun --nproc_per_node=1 train_ddp.py`` job, in a session of its own."""

    def __init__(self, config: Path, run_dir: Path, overrides: list[str], log: Path, dry_run: bool):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(REPO / "train_ddp.py"), "--config", str(config), f"run_dir={run_dir}", *overrides]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)  # keep carried packages importable
        env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1" if dry_run else "4"}
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def worker(self) -> int | None:
        for pid in _descendants(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"train_ddp.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(timeout=max(left(deadline), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise PhaseTimeout(f"{self.log.name}: still running when the time budget was spent") from None

    def kill(self) -> None:
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def logged_losses(run_dir: Path) -> dict[int, tuple]:
    """step -> (loss, mlm_loss, nce_loss) of the training lines of ``log.jsonl``."""
    out = {}
    path = run_dir / "log.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.endswith("}"):
            rec = json.loads(line)
            if rec.get("kind", "train") == "train":
                out[rec["step"]] = (rec["loss"], rec["mlm_loss"], rec["nce_loss"])
    return out


def last_train_record(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.endswith("}")]
    return next((r for r in reversed(lines) if r.get("kind", "train") == "train"), {})


def compare_runs(ref_dir: Path, resumed_dir: Path, logs: dict[str, Path], steps: int) -> dict:
    ref, got = logged_losses(ref_dir), logged_losses(resumed_dir)
    out: dict = {"logs": {k: str(v) for k, v in logs.items()}}
    m = re.search(r"ranks \((\w+), ([^)]+)\); precision ([^;]+);", logs["reference"].read_text())
    out["backend"], out["device"], out["precision"] = m.groups() if m else (None, None, None)
    m = re.search(r"resumed from \S+ at step (\d+)", logs["resumed"].read_text())
    out["resumed_at_step"] = int(m.group(1)) if m else None
    if sorted(ref) != list(range(1, steps + 1)) or sorted(got) != sorted(ref):
        return out | {"ok": False, "error": f"logged steps differ: reference {sorted(ref)[-3:]}..., resumed {sorted(got)[-3:]}..."}
    diffs = [abs(a - b) / max(abs(b), 1e-12) for s in ref for a, b in zip(got[s], ref[s])]
    losses = [ref[s][0] for s in sorted(ref)]
    q = max(1, steps // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    record = last_train_record(ref_dir)
    out |= {
        "steps": steps,
        "exact": max(diffs) == 0.0,
        "max_rel_diff": max(diffs),
        "loss_first_quarter": first,
        "loss_last_quarter": last,
        "loss_fell": last < first,
        "reference_log": {k: record.get(k) for k in ("tokens_per_s", "mfu", "memory_gib", "grad_norm", "skipped_steps")},
    }
    interrupted = out["resumed_at_step"] is not None and 0 < out["resumed_at_step"] < steps
    out["ok"] = interrupted and out["max_rel_diff"] <= RESUME_MAX_REL_DIFF and out["loss_fell"]
    return out


def check_resume(deadline: float, plan: Plan, device: torch.device, shards: str, work: Path, attention: str) -> dict:
    """Per precision: reference, interrupted and resumed runs. A precision that fails or runs out of
    time is recorded and the others go on (an fp16 failure must not hide the bf16 result)."""
    precisions = ("bf16", "fp16") if device.type == "cuda" else ("bf16",)
    config = resume_config(plan, shards, work)
    stop_after = max(1, plan.resume_steps // 3)
    jobs: dict[str, dict] = {}
    results: dict[str, dict] = {}
    launches: list[Launch] = []

    def fail(prec: str, error: str) -> None:
        for launch in (jobs[prec].get(k) for k in ("ref", "cut", "res")):  # free the device for the others
            if launch is not None and launch.proc.poll() is None:
                launch.kill()
        results[prec] = {"ok": False, "error": error, "logs": {k: str(v) for k, v in jobs[prec]["logs"].items()}}
        print(f"  {prec}: FAILED {error}", flush=True)

    try:
        for prec in precisions:  # every run at once: they share the device, and time is short
            base = work / f"resume-{prec}"
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            logs = {k: base / f"{k}.log" for k in ("reference", "interrupted", "resumed")}
            overrides = [f"train.precision={prec}", f"train.attention={attention}"]
            jobs[prec] = {"base": base, "logs": logs, "overrides": overrides,
                          "ref": Launch(config, base / "reference", overrides, logs["reference"], plan.dry_run),
                          "cut": Launch(config, base / "interrupted", overrides, logs["interrupted"], plan.dry_run)}  # fmt: skip
            launches += [jobs[prec]["ref"], jobs[prec]["cut"]]
        waiting = set(precisions)
        while waiting:  # SIGTERM each interrupted run's worker once it has logged stop_after steps
            for prec in sorted(waiting):
                job = jobs[prec]
                if job["cut"].proc.poll() is not None:
                    fail(prec, f"the run to interrupt ended first (exit {job['cut'].proc.returncode}); see {job['logs']['interrupted']}")
                    waiting.discard(prec)
                    continue
                worker = job["cut"].worker() if len(logged_losses(job["base"] / "interrupted")) >= stop_after else None
                if worker:
                    os.kill(worker, signal.SIGTERM)
                    waiting.discard(prec)
            if waiting and left(deadline) <= 0:
                for prec in sorted(waiting):
                    fail(prec, f"did not reach step {stop_after} in the time budget")
                break
            time.sleep(0.02)
        exits: dict[str, dict] = {}
        for prec in [p for p in precisions if p not in results]:
            try:
                exits[prec] = {"reference": jobs[prec]["ref"].wait(deadline), "interrupted": jobs[prec]["cut"].wait(deadline)}
            except PhaseTimeout as exc:
                fail(prec, str(exc))
                continue
            jobs[prec]["res"] = Launch(config, jobs[prec]["base"] / "interrupted", jobs[prec]["overrides"], jobs[prec]["logs"]["resumed"], plan.dry_run)
            launches.append(jobs[prec]["res"])
        for prec in exits:
            try:
                exits[prec]["resumed"] = jobs[prec]["res"].wait(deadline)
            except PhaseTimeout as exc:
                fail(prec, str(exc))
                continue
            if any(exits[prec].values()):
                fail(prec, f"exit codes {exits[prec]}")
                continue
            results[prec] = r = compare_runs(jobs[prec]["base"] / "reference", jobs[prec]["base"] / "interrupted",
                                             jobs[prec]["logs"], plan.resume_steps)  # fmt: skip
            print(f"  {prec}: " + (f"resumed at step {r['resumed_at_step']}, losses after resume "
                                   f"{'identical' if r['exact'] else 'max rel diff %.2e' % r['max_rel_diff']}; loss "
                                   f"{r['loss_first_quarter']:.3f} -> {r['loss_last_quarter']:.3f}; backend {r['backend']}"
                                   if "exact" in r else f"FAILED {r.get('error')}"), flush=True)  # fmt: skip
        return {"ok": all(results[p]["ok"] for p in precisions), "config": str(config), "attention": attention, "stop_after": stop_after,
                "max_rel_diff_allowed": RESUME_MAX_REL_DIFF, "runs": {p: results[p] for p in precisions}}  # fmt: skip
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                launch.kill()


# --------------------------------------------------------------------------- main


def load_data(deadline: float, plan: Plan, shards_arg: str | None, holder: dict) -> dict:
    shards, origin = train_bench.find_or_make_shards(shards_arg)
    batches = train_bench.make_batches(shards, plan.distinct, plan.max_tokens, plan.row_len, seed=0)
    holder.update(shards=shards, batches=batches)
    return {"ok": origin == "real", "shards": shards, "bars": origin,
            **({"error": "the preprocessor could not run: SYNTHETIC bars"} if origin != "real" else {})}  # fmt: skip


def result_line(report: dict) -> str:
    p = report["phases"]
    speed = p.get("speed", {})
    variants = speed.get("variants", {})
    best = variants.get(speed.get("best") or "", {})
    fields = {
        "ok": int(set(p) == set(PHASES) and all(ph.get("ok") for ph in p.values())),  # 0 in a report written mid-run
        "device": report["device"].replace(" ", "_"),
        "correctness": "pass" if p.get("correctness", {}).get("ok") else "FAIL",
        "best_layout": speed.get("best"),
        "real_tokens_per_s": f"{best['real_tokens_per_s']:.0f}" if best else None,
        "mfu": f"{best['mfu']:.3f}" if best.get("mfu") is not None else None,
        "peak_memory_gib": f"{best['peak_memory_gib']:.2f}" if best.get("peak_memory_gib") is not None else None,
        "hf_real_tokens_per_s": f"{variants['hf']['real_tokens_per_s']:.0f}" if "real_tokens_per_s" in variants.get("hf", {}) else None,
        "ratio_vs_hf": f"{speed['ratio_best_vs_hf']:.2f}" if speed.get("ratio_best_vs_hf") else None,
    }
    for prec, r in p.get("resume", {}).get("runs", {}).items():
        fields[f"resume_{prec}"] = ("exact" if r.get("exact") else f"diff{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "FAIL")
    fields["seconds"] = f"{report['seconds']:.0f}"
    return "RESULT " + " ".join(f"{k}={v}" for k, v in fields.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model (automatic without CUDA)")
    ap.add_argument("--shards", help="shard folder (default: examples/midi preprocessed once into runs/bench/shards)")
    ap.add_argument("--out", help="JSON file (default runs/bench/gpu.json, or gpu-dry-run.json)")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench" / "gpu"), help="folder for the resume runs")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per variant on GPU (default 30)")
    ap.add_argument("--resume-steps", type=int, help="steps of each train_ddp.py run (default 30; 12 in the dry run)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile-d blocks variant")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: running the CPU dry run (--dry-run)", flush=True)
    plan = make_plan(not cuda, args)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    work = Path(args.work) / ("dry-run" if plan.dry_run else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or REPO / "runs" / "bench" / ("gpu-dry-run.json" if plan.dry_run else "gpu.json"))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; torch {torch.__version__}; {'dry run, tiny model' if plan.dry_run else 'BERT-base'}; "
          f"budgets {plan.budgets} s", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "device": name, "torch": torch.__version__, "dry_run": plan.dry_run, "plan": plan.__dict__,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "phases": {}}  # fmt: skip
    phases = report["phases"]

    def record(name: str, budget_s: float, fn, *fn_args) -> None:
        """Run a phase and write the report so far: a run killed from outside keeps the phases it finished."""
        phases[name] = run_phase(name, budget_s, fn, *fn_args)
        write_report(report, out, t0)

    data: dict = {}
    record("data", plan.budgets["data"], load_data, plan, args.shards, data)
    if "batches" in data:
        record("correctness", plan.budgets["correctness"], check_layouts, plan, device, data["batches"][0])
        record("speed", plan.budgets["speed"], measure_speed, plan, device, data["batches"], cuda and not args.no_compile)
        # The runs use the default layout (varlen on GPU) unless it failed its check: then bars, so that
        # a varlen bug does not hide whether nccl, bf16, fp16 and resume work.
        varlen_failed = any(c["layout"] == "varlen" and c.get("ok") is False for c in phases["correctness"].get("checks", []))
        attention = "bars" if varlen_failed else "auto"
        record("resume", plan.budgets["resume"], check_resume, plan, device, data["shards"], work, attention)
    print(f"wrote {out}", flush=True)
    print(report["result"], flush=True)
    return 0 if all(ph.get("ok") for ph in phases.values()) else 1


def write_report(report: dict, out: Path, t0: float) -> None:
    """Bring ``seconds`` and the RESULT line up to date and write the JSON file atomically."""
    report["seconds"] = time.perf_counter() - t0
    report["result"] = result_line(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
