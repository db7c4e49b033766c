"""GPU check: replay parity, decode speed and KV memory, the training step and a fixed-KV-budget run, in one
JSON report (one H100/H200, about 8 minutes, torch + this project's dependencies, random weights only).

Each section (``--sections``, default all) is wrapped: a failure is recorded (``status: "error"``, the error,
the traceback's tail) and the next section runs; the JSON is rewritten after every section and decode cell.

1. ``replay_parity``: a random 4-layer Qwen2 (hidden 256, 4 query / 2 KV heads, head_dim 64) samples an NGC
   rollout (`generate_with_eviction`, ``sample_evictions=True``) in fp32 and in bf16; each is replayed with
   backend ``"flex"`` (compiled FlexAttention on CUDA) and ``"dense"`` (SDPA + boolean masks). Reported: max
   |flex − dense| of the token log-probs (forward) and of the gradients of ``Σ eviction log-probs + Σ token
   log-probs`` w.r.t. every parameter (backward; absolute and relative to max |dense grad|), the replayed
   log-probs vs the rollout's (``token_logprobs``, ``records.logp``), each with the smallest `TOLS` bound.
2. ``decode``: `bench/decode.py`'s cells (tokens/s, ``cache_stats`` peak K+V bytes, the CUDA peak delta,
   eviction-round share, ratios vs full) for ``full``, ``ngc`` and ``--heuristic`` (``tova``) on the
   DeepSeek-R1-Distill-Qwen-1.5B shape, bf16, batch 32, 1024 / 4096 / 8192 new tokens, δ 256, ε 0.5, b 32.
   Targets: rounds ≤ 5% of the time; NGC ≥ 1.0x full tokens/s at the shortest length, ≥ 1.5x at the longest.
3. ``train_step``: `bench/train_step.py`'s timers on the r1-1.5b shape with LoRA: the loss phase (forward +
   backward on the same NGC rollouts) and `trainer.train()` steps, NGCTrainer vs TRL's GRPOTrainer, with
   peak memory (one trainer on the GPU at a time). Target: NGC ≤ 1.15x vanilla.
4. ``fixed_budget``: budget = the full cache's peak K+V bytes at ``--fixed_batch`` x ``--fixed_length``;
   per-sequence peaks give how many sequences each method fits, and NGC is run at its batch. Targets: ≥ 2x
   sequences, ≥ 1.8x tokens/s.

``--budget_s`` (default 460) is split over the sections (`PLAN_S`; what a section leaves goes to the next);
decode cells, train steps and the fixed-budget run predicted (from what was measured) to overrun are
skipped and listed with the prediction. ``--dry_run``: the same code on CPU in well under a minute ("tiny"
shape, 32-64 tokens, batch 2, one step, δ 16, b 4; FlexAttention has no CPU backward, so the flex row's
backward runs dense, recorded as ``backward_backend``), ``"dry_run": true`` in the JSON.

This file holds the CLI, the time budget and the JSON report; the sections are in `bench/gpu_sections.py`.

    python bench/gpu_check.py --out outputs/bench/gpu_check.json            # GPU (make gpu_check)
    python bench/gpu_check.py --dry_run --out /tmp/gpu_check.json           # CPU, < 1 min
    python bench/gpu_check.py --sections decode --lengths 8192 --budget_s 560 --out /tmp/decode8k.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.policies import POLICIES

if (
    str(Path(__file__).resolve().parent) not in sys.path
):  # the sibling benchmarks (`python bench/x.py` adds it)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as decode_bench  # noqa: E402
import gpu_sections  # noqa: E402
from gpu_sections import PARITY_MODEL, free_cuda  # noqa: E402

SECTIONS = ("replay_parity", "decode", "train_step", "fixed_budget")
PLAN_S = {
    "replay_parity": 70,
    "decode": 190,
    "train_step": 110,
    "fixed_budget": 90,
}  # seconds, sum = --budget_s
REAL = {  # settings of the GPU run
    "replay_parity": dict(prompt_lens=[37, 64, 50, 23], new_tokens=160, eviction_interval=32, block_size=8),
    "decode": dict(
        shape="r1-1.5b",
        prompt_len=64,
        eviction_interval=256,
        eviction_rate=0.5,
        block_size=32,
        lengths=[1024, 4096, 8192],
        batch_size=32,
        fixed_length=4096,
    ),
    "train_step": dict(
        shape="r1-1.5b",
        batch_size=8,
        num_generations=4,
        prompt_len=48,
        completion_len=512,
        steps=1,
        repeats=2,
        eviction_interval=256,
        eviction_rate=0.5,
        block_size=32,
    ),
}
DRY = {  # the same code on CPU, small enough for a test
    "replay_parity": dict(prompt_lens=[11, 16], new_tokens=40, eviction_interval=16, block_size=4),
    "decode": dict(
        shape="tiny",
        prompt_len=16,
        eviction_interval=16,
        eviction_rate=0.5,
        block_size=4,
        lengths=[32, 48, 64],
        batch_size=2,
        fixed_length=48,
    ),
    "train_step": dict(
        shape="tiny",
        batch_size=2,
        num_generations=2,
        prompt_len=24,
        completion_len=32,
        steps=1,
        repeats=1,
        eviction_interval=16,
        eviction_rate=0.5,
        block_size=4,
    ),
}


# ----------------------------------------------------------------------------------------------- arguments
def check_head_dim(model_kw: dict, name: str) -> int:
    """head_dim of a Qwen2Config kwargs dict; raises unless it is a multiple of 16 in [16, 256] (flash-attn
    takes multiples of 8 up to 256; Triton's ``tl.dot`` in the FlexAttention kernels needs dims ≥ 16)."""
    hd = model_kw.get("head_dim") or model_kw["hidden_size"] // model_kw["num_attention_heads"]
    if hd % 16 or not 16 <= hd <= 256:
        raise ValueError(f"{name}: head_dim {hd} must be a multiple of 16 in [16, 256] for the GPU kernels")
    return hd


def parse_args(argv=None):
    """Arguments, with the per-section settings of the real or dry run resolved into ``args.cfg``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--lengths", default=None, help="decode lengths, comma list (default 1024,4096,8192)")
    p.add_argument("--batch_size", type=int, default=None, help="decode batch (default 32; train_step: 8)")
    p.add_argument("--heuristic", default="tova", help="the heuristic policy decoded next to full and ngc")
    p.add_argument("--fixed_length", type=int, default=None, help="fixed_budget: tokens per sequence (4096)")
    p.add_argument(
        "--fixed_batch", type=int, default=None, help="fixed_budget: full-cache batch (= --batch_size)"
    )
    p.add_argument("--max_fixed_batch", type=int, default=1024, help="fixed_budget: cap on NGC's batch")
    p.add_argument("--budget_s", type=float, default=None, help="total seconds (default 460; dry run 600)")
    p.add_argument("--device", default=None, help="default cuda (dry run: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry_run", action="store_true", help="tiny shapes on CPU: the same code paths, < 1 min")
    p.add_argument("--out", default="outputs/bench/gpu_check.json")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    cfg = copy.deepcopy(DRY if a.dry_run else REAL)
    d = cfg["decode"]
    try:
        d["lengths"] = (
            d["lengths"] if a.lengths is None else [int(x) for x in a.lengths.split(",") if x.strip()]
        )
    except ValueError:
        p.error(f"--lengths {a.lengths!r}: comma list of integers")
    d.update(
        {k: v for k, v in (("batch_size", a.batch_size), ("fixed_length", a.fixed_length)) if v is not None}
    )
    d["fixed_batch"] = a.fixed_batch if a.fixed_batch is not None else d["batch_size"]
    a.device = a.device or ("cpu" if a.dry_run else "cuda")
    a.budget_s = (
        a.budget_s if a.budget_s is not None else (600.0 if a.dry_run else float(sum(PLAN_S.values())))
    )
    a.sections = [s for s in dict.fromkeys(x.strip() for x in a.sections.split(",")) if s]
    try:
        validate(a, cfg)
    except ValueError as e:
        p.error(str(e))
    a.cfg = cfg
    return a


def validate(a, cfg) -> None:
    """Raise ValueError for settings the check cannot run with (before any model is built)."""
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad or not a.sections:
        raise ValueError(f"--sections: unknown {bad}; valid: {', '.join(SECTIONS)}")
    if a.heuristic not in POLICIES or a.heuristic in ("full", "ngc", "oracle"):
        raise ValueError(
            f"--heuristic {a.heuristic!r}: a heuristic of ngc_trl.policies other than full/ngc/oracle"
        )
    if not a.device.startswith(("cpu", "cuda")):
        raise ValueError(f"--device {a.device!r}: cpu or cuda[:N]")
    if not a.dry_run and not a.device.startswith("cuda"):
        raise ValueError("the real check needs --device cuda (use --dry_run on CPU)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available")
    if a.budget_s <= 0:
        raise ValueError("--budget_s must be positive")
    d = cfg["decode"]
    for name in ("batch_size", "fixed_batch", "fixed_length"):
        if d[name] < 1:
            raise ValueError(f"--{name} must be >= 1, got {d[name]}")
    if a.max_fixed_batch < 1:
        raise ValueError("--max_fixed_batch must be >= 1")
    if not d["lengths"]:
        raise ValueError("--lengths: at least one length")
    ev = EvictionConfig(eviction_interval=d["eviction_interval"], block_size=d["block_size"])
    for n in [*d["lengths"], d["fixed_length"]]:
        if n < 1 or not ev.round_positions(d["prompt_len"], d["prompt_len"] + n):
            raise ValueError(
                f"length {n}: no eviction round fires with prompt {d['prompt_len']} and "
                f"δ={d['eviction_interval']} (NGC would equal the full cache)"
            )
    check_head_dim(PARITY_MODEL, "replay_parity model")
    check_head_dim(decode_bench.SHAPES[d["shape"]][0], f"decode shape {d['shape']}")
    check_head_dim(decode_bench.SHAPES[cfg["train_step"]["shape"]][0], "train_step shape")


# ------------------------------------------------------------------------------------------------ helpers
def write_json(path, report: dict) -> None:
    """Write ``report`` atomically (a kill mid-write leaves the previous version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


class Run:
    """Run state: arguments, the report being written, the deadlines and the models sections share."""

    def __init__(self, args):
        self.args, self.cfg = args, args.cfg
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if args.dry_run and self.device.type == "cpu":
            torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a shared CPU (100x slower)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.section_deadline = self.deadline
        self.command = shlex.join([sys.executable, str(Path(__file__)), *args.argv])
        self.machine = decode_bench.machine_info(self.device)
        self._decode_model = None
        self.decode_rows: list[dict] = []
        self.report = {
            "check": "gpu_check",
            "dry_run": args.dry_run,
            "command": self.command,
            "machine": self.machine,
            "budget_s": args.budget_s,
            "sections_run": args.sections,
            "settings": {
                "sections": self.cfg,
                "parity_model": PARITY_MODEL,
                "heuristic": args.heuristic,
                "max_fixed_batch": args.max_fixed_batch,
                "seed": args.seed,
            },
        }

    def left(self) -> float:
        """Seconds left to the current section."""
        return self.section_deadline - time.perf_counter()

    def start(self, name: str) -> float:
        """Open section ``name``'s allowance: what is left minus the plans of the sections after it (at least
        its own plan, within the total)."""
        now = time.perf_counter()
        later = self.args.sections[self.args.sections.index(name) + 1 :]
        remaining = self.deadline - now
        allowance = max(min(PLAN_S[name], remaining), remaining - sum(PLAN_S[s] for s in later))
        self.section_deadline = now + allowance
        return allowance

    def flush(self) -> None:
        self.report["total_s"] = time.perf_counter() - self.t0
        write_json(self.args.out, self.report)

    def decode_model(self):
        """The random-weight decode model (r1-1.5b shape on GPU, tiny in the dry run), built once."""
        if self._decode_model is None:
            self._decode_model = decode_bench.build_model(
                self.cfg["decode"]["shape"], str(self.device), self.dtype, self.args.seed
            )
        return self._decode_model


# ---------------------------------------------------------------------------------------------------- main
RUNNERS = {
    "replay_parity": gpu_sections.section_replay_parity,
    "decode": gpu_sections.section_decode,
    "train_step": gpu_sections.section_train_step,
    "fixed_budget": gpu_sections.section_fixed_budget,
}


def run_section(run: Run, name: str) -> dict:
    """Run one section into ``report[name]``; an exception is recorded there (what it filled so far stays)."""
    allowance = run.start(name)
    res = run.report[name] = {
        "status": "running",
        "command": run.command,
        "machine": run.machine,
        "allowance_s": allowance,
    }
    run.flush()
    print(f"[{name}] allowance {allowance:.0f}s", flush=True)
    t0 = time.perf_counter()
    try:
        RUNNERS[name](run, res)
        res["status"] = "ok"
    except Exception as e:  # recorded; the next section still runs
        res.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        print(f"[{name}] error: {res['error']}", flush=True)
    res["seconds"] = time.perf_counter() - t0
    free_cuda()
    run.flush()
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = Run(args)
    print(
        f"gpu_check{' (dry run)' if args.dry_run else ''} on {run.machine.get('device_name', args.device)}, "
        f"sections {','.join(args.sections)}, budget {args.budget_s:.0f}s -> {args.out}",
        flush=True,
    )
    for name in SECTIONS:
        if name not in args.sections:
            run.report[name] = {"status": "not_selected"}
    for name in args.sections:
        run_section(run, name)
    run.report["targets"] = {
        f"{name}.{k}": v
        for name in args.sections
        for k, v in run.report[name].get("targets", {}).items()
        if isinstance(v, bool) or v is None
    }
    run.report["errors"] = [name for name in args.sections if run.report[name]["status"] == "error"]
    run.flush()
    print(
        json.dumps(
            {
                "targets": run.report["targets"],
                "errors": run.report["errors"],
                "total_s": run.report["total_s"],
            },
            indent=2,
        )
    )
    return run.report


if __name__ == "__main__":
    main()
