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

    python bench/gpu_check.py --out outputs/bench/gpu_check.json            # GPU (make gpu_check)
    python bench/gpu_check.py --dry_run --out /tmp/gpu_check.json           # CPU, < 1 min
    python bench/gpu_check.py --sections decode --lengths 8192 --budget_s 560 --out /tmp/decode8k.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.engine.replay import ReplayContext, replay_forward
from ngc_trl.policies import POLICIES

if (
    str(Path(__file__).resolve().parent) not in sys.path
):  # the sibling benchmarks (`python bench/x.py` adds it)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as decode_bench  # noqa: E402
import train_step as train_bench  # noqa: E402

SECTIONS = ("replay_parity", "decode", "train_step", "fixed_budget")
PLAN_S = {
    "replay_parity": 70,
    "decode": 190,
    "train_step": 110,
    "fixed_budget": 90,
}  # seconds, sum = --budget_s
TOLS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 5e-2)
PARITY_MODEL = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=512,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    initializer_range=0.2,
)  # peaky attention: a wrong mask shows
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
def tolerance(x: float | None) -> float | None:
    """The smallest tolerance of `TOLS` that bounds ``x`` (None if none does, or ``x`` is not finite)."""
    if x is None or not math.isfinite(x):
        return None
    return next((t for t in TOLS if x <= t), None)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in fp32 over same-shaped tensors (0 when empty)."""
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def write_json(path, report: dict) -> None:
    """Write ``report`` atomically (a kill mid-write leaves the previous version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


# -------------------------------------------------------------------------------------- 1. replay parity
def parity_model(device, seed: int):
    """The random fp32 Qwen2 of `PARITY_MODEL` on ``device`` (eval mode)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **PARITY_MODEL)
    return Qwen2ForCausalLM(cfg).to(device).eval()


def parity_rollout(model, s: dict, device, seed: int):
    """A sampled NGC rollout from left-padded random prompts of lengths ``s["prompt_lens"]``. The EOS token
    is one that row 1 sampled two thirds of the way in an EOS-free probe with the same seed, so rows end at
    different lengths. Returns (prompt mask ``(B, P)``, `EvictionOutput`, full mask ``(B, P + T)``, config)."""
    cfg = EvictionConfig(policy="ngc", eviction_interval=s["eviction_interval"], block_size=s["block_size"])
    lens, n = s["prompt_lens"], s["new_tokens"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, k in enumerate(lens):
        ids[i, -k:] = torch.randint(3, PARITY_MODEL["vocab_size"], (k,), generator=g)
        mask[i, -k:] = 1
    ids, mask = ids.to(device), mask.to(device)

    def go(eos):
        torch.manual_seed(seed)
        return generate_with_eviction(
            model,
            ids,
            mask,
            cfg,
            max_new_tokens=n,
            do_sample=True,
            temperature=1.0,
            sample_evictions=True,
            eos_token_id=eos,
            pad_token_id=0,
        )

    probe = go([])
    out = go([int(probe.sequences[min(1, len(lens) - 1), -(n // 3)])])
    return mask, out, torch.cat([mask.bool(), out.completion_mask], 1), cfg


def replay_once(model, mask, out, full_mask, cfg, backend: str, backward: bool):
    """One replay of the rollout with ``backend``. Returns token log-probs ``(B, P + T − 1)``, eviction
    log-probs ``(B, R, L)`` and, when ``backward``, the flat fp32 gradient ``(n_params,)`` of
    ``Σ eviction log-probs (acted) + Σ completion token log-probs``."""
    ctx = ReplayContext(full_mask.long(), out.records, cfg, prompt_len=mask.sum(1), backend=backend)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        logp = replay_forward(model, out.sequences, full_mask.long(), ctx)
        ev = ctx.eviction_logp(model.config.num_hidden_layers)
        grads = None
        if backward:
            tok = logp[:, mask.shape[1] - 1 :]
            (ev[out.records.acted].sum() + tok[out.completion_mask].sum()).backward()
            grads = torch.cat(
                [
                    (q.grad if q.grad is not None else torch.zeros_like(q)).float().flatten()
                    for q in model.parameters()
                ]
            )
            model.zero_grad(set_to_none=True)
    return logp.detach(), ev.detach(), grads


def parity_for_dtype(model, s: dict, device, seed: int) -> dict:
    """Rollout + flex/dense replays of ``model`` (already in the dtype checked); the diffs and tolerances."""
    mask, out, full_mask, cfg = parity_rollout(model, s, device, seed)
    acted, comp = out.records.acted, out.completion_mask
    p = mask.shape[1]
    res, backward_backend = {}, {}
    for backend in ("dense", "flex"):
        bw = backend if backend != "flex" or device.type == "cuda" else "dense"  # no flex backward on CPU
        backward_backend[backend] = bw
        if bw == backend:
            res[backend] = replay_once(model, mask, out, full_mask, cfg, backend, True)
        else:
            logp, ev, _ = replay_once(model, mask, out, full_mask, cfg, backend, False)
            res[backend] = (logp, ev, replay_once(model, mask, out, full_mask, cfg, bw, True)[2])
    (ld, ed, gd), (lf, ef, gf) = res["dense"], res["flex"]
    valid = full_mask[:, 1:] & full_mask[:, :-1]  # predictions made from real tokens
    grad_abs = max_abs(gf, gd)
    grad_scale = float(gd.abs().max())
    diffs = {
        "forward_token_logp_all": max_abs(lf[valid], ld[valid]),
        "forward_token_logp_completion": max_abs(lf[:, p - 1 :][comp], ld[:, p - 1 :][comp]),
        "forward_eviction_logp": max_abs(ef[acted], ed[acted]),
        "backward_grad_abs": grad_abs,
        "backward_grad_rel": grad_abs / max(grad_scale, 1e-30),
    }
    for name, (lg, ev, _) in res.items():
        diffs[f"{name}_vs_rollout_token_logp"] = max_abs(lg[:, p - 1 :][comp], out.token_logprobs[comp])
        diffs[f"{name}_vs_rollout_eviction_logp"] = max_abs(ev[acted], out.records.logp[acted])
    return {
        "max_abs_diff": diffs,
        "tolerance": {k: tolerance(v) for k, v in diffs.items()},
        "backward_backend": backward_backend,
        "grad_max_abs_dense": grad_scale,
        "n_params": int(gd.numel()),
        "completion_lengths": comp.sum(1).tolist(),
        "rounds_per_row": (out.records.positions >= 0).sum(1).tolist(),
        "actions": int(acted.sum()),
        "rows_with_actions": int((acted.sum((1, 2)) > 0).sum()),
    }


def section_replay_parity(run: Run, res: dict) -> None:
    s = run.cfg["replay_parity"]
    res["settings"] = {
        **s,
        "policy": "ngc",
        "sample_evictions": True,
        "eviction_rate": 0.5,
        "flex": "torch.compile(flex_attention, dynamic=True)"
        if run.device.type == "cuda"
        else "uncompiled flex_attention (forward only on CPU)",
        "loss": "sum of acted eviction log-probs + sum of completion token log-probs",
    }
    base = parity_model(run.device, run.args.seed)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        res[name] = parity_for_dtype(model, s, run.device, run.args.seed)
        run.flush()
    fp32, bf16 = res["fp32"]["max_abs_diff"], res["bf16"]["max_abs_diff"]
    # bf16 token log-probs of this random model differ by ~0.1 between any two implementations (its logits
    # are large: initializer_range 0.2), so bf16 flex-vs-dense is judged against the rollout-vs-replay gap
    noise = max(bf16["dense_vs_rollout_token_logp"], bf16["flex_vs_rollout_token_logp"])
    res["bf16_token_noise_floor"] = noise
    res["targets"] = {  # this script's thresholds
        "fp32_forward_le_1e-4": fp32["forward_token_logp_all"] <= 1e-4,
        "fp32_eviction_logp_le_1e-4": fp32["forward_eviction_logp"] <= 1e-4,
        "fp32_backward_rel_le_1e-3": fp32["backward_grad_rel"] <= 1e-3,
        "fp32_flex_vs_rollout_le_1e-4": max(
            fp32["flex_vs_rollout_token_logp"], fp32["flex_vs_rollout_eviction_logp"]
        )
        <= 1e-4,
        "bf16_forward_le_2x_noise_floor": bf16["forward_token_logp_all"] <= 2 * noise,
        "bf16_eviction_logp_le_5e-2": bf16["forward_eviction_logp"] <= 5e-2,
        "bf16_backward_rel_le_5e-2": bf16["backward_grad_rel"] <= 5e-2,
    }


# --------------------------------------------------------------------------------------------- 2. decode
def decode_namespace(d: dict, batch: int, seed: int) -> SimpleNamespace:
    """The argument set `decode.bench_cell` reads; ``lengths`` holds only the warm-up length (one round)."""
    warm = min(d["eviction_interval"] + d["prompt_len"], min(d["lengths"]))
    return SimpleNamespace(
        eviction_interval=d["eviction_interval"],
        eviction_rate=d["eviction_rate"],
        block_size=d["block_size"],
        compression_ratio=8,
        batch_size=batch,
        prompt_len=d["prompt_len"],
        seed=seed,
        lengths=[warm],
        repeats=1,
    )


def timed_cell(run: Run, ns, policy: str, length: int, warmed: set) -> dict:
    """One `decode.bench_cell` (warm-up included on a policy's first cell), plus the CUDA peak delta over the
    memory allocated before it (weights and anything else live) and the wall time with warm-up."""
    model = run.decode_model()
    base = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else None
    t0 = time.perf_counter()
    row = decode_bench.bench_cell(model, ns, policy, length, run.device, warmed)
    row["seconds_with_warmup"] = time.perf_counter() - t0
    mem = row["cuda_max_memory_allocated"]
    row["cuda_memory_before_bytes"] = base
    row["cuda_peak_delta_bytes"] = None if mem is None else mem - base
    return row


def predict_s(rate: dict, policy: str, length: int, warmup: int = 0) -> float | None:
    """Predicted seconds of a cell from the seconds per decode step measured so far (``rate[policy] =
    (s/step, longest length)``, else the slowest policy's): linear in ``length`` (+ ``warmup`` steps), x1.3
    beyond the longest length measured (attention grows with the cache). None before any measurement."""
    known = rate.get(policy) or (max(rate.values()) if rate else None)
    if known is None:
        return None
    per_tok, at = known
    return per_tok * (length * (1.3 if length > at else 1.0) + warmup)


def rates_of(rows: list[dict]) -> dict:
    """``{policy: (s/step, longest length)}`` of measured decode rows (their longest length's rate)."""
    out: dict = {}
    for r in sorted(rows, key=lambda r: r["length"]):
        out[r["policy"]] = (r["wall_s"] / r["length"], r["length"])
    return out


def decode_summary(rows: list[dict]) -> dict:
    """``{length: {policy: tokens/s, ratios, peak bytes, eviction share}}`` of the measured rows."""
    out: dict = {}
    for r in rows:
        out.setdefault(str(r["length"]), {})[r["policy"]] = {
            k: r.get(k)
            for k in (
                "tokens_per_s",
                "tokens_per_s_ratio",
                "peak_kv_bytes",
                "peak_kv_bytes_ratio",
                "expected_bytes_ratio",
                "cuda_peak_delta_bytes",
                "eviction_share",
                "wall_s",
            )
        }
    return out


def decode_targets(rows: list[dict], lengths: list[int], heuristic: str) -> dict:
    """The section's booleans (None where the cells were not measured)."""

    def ratio(n):
        r = [x for x in rows if x["policy"] == "ngc" and x["length"] == n and "tokens_per_s_ratio" in x]
        return r[0]["tokens_per_s_ratio"] if r else None

    def share_ok(policy):
        shares = [r["eviction_share"] for r in rows if r["policy"] == policy]
        return all(x <= 0.05 for x in shares) if shares else None

    short, long = ratio(min(lengths)), ratio(max(lengths))
    return {
        "eviction_share_le_5pct": share_ok("ngc"),
        "heuristic_eviction_share_le_5pct": share_ok(heuristic),
        "ngc_tokens_per_s_ge_1x_full_at_shortest": None if short is None else short >= 1.0,
        "ngc_tokens_per_s_ge_1.5x_full_at_longest": None if long is None else long >= 1.5,
        "lengths": {"shortest": min(lengths), "longest": max(lengths)},
    }


def section_decode(run: Run, res: dict) -> None:
    d, heur = run.cfg["decode"], run.args.heuristic
    lengths = sorted(set(d["lengths"]))
    ns = decode_namespace(d, d["batch_size"], run.args.seed)
    res["settings"] = {
        **d,
        "policies": ["full", "ngc", heur],
        "dtype": str(run.dtype),
        "warmup_length": ns.lengths[0],
        "order": "full and ngc at every length (ascending), then the heuristic",
        "eviction_time": "host-timed around each round (on CUDA it may include queued decode work)",
    }
    model = run.decode_model()
    res["n_params"] = sum(q.numel() for q in model.parameters())
    res["rows"], res["skipped"] = [], []
    warmed, rate = set(), {}
    for length, policy in [(n, q) for n in lengths for q in ("full", "ngc")] + [(n, heur) for n in lengths]:
        est = predict_s(rate, policy, length, 0 if policy in warmed else ns.lengths[0])
        if est is not None and est > run.left():
            res["skipped"].append(
                {"length": length, "policy": policy, "predicted_s": est, "left_s": run.left()}
            )
            continue
        row = timed_cell(run, ns, policy, length, warmed)
        res["rows"].append(row)
        rate = rates_of(res["rows"])
        run.decode_rows.append(row)
        print(
            f"  decode {length:>6} {policy:<8} {row['tokens_per_s']:>10.1f} tok/s  "
            f"KV {row['peak_kv_bytes'] / 2**20:>9.1f} MiB  evict {100 * row['eviction_share']:.2f}%",
            flush=True,
        )
        run.flush()
    with_full = {r["length"] for r in res["rows"] if r["policy"] == "full"}
    decode_bench.add_ratios([r for r in res["rows"] if r["length"] in with_full])
    res["summary"] = decode_summary(res["rows"])
    res["targets"] = decode_targets(res["rows"], lengths, heur)


# ----------------------------------------------------------------------------------------- 3. train step
@contextlib.contextmanager
def weights_built_on_device():
    """Make `train_step.build_model` create its random weights directly on its ``device`` argument (a 1.5B
    init on the CPU takes tens of seconds)."""
    orig = train_bench.build_model

    def build(shape, vocab, device, dtype):
        with torch.device(device):
            return orig(shape, vocab, device, dtype)

    train_bench.build_model = build
    try:
        yield
    finally:
        train_bench.build_model = orig


def train_namespace(t: dict) -> SimpleNamespace:
    """The argument set `train_step.make_trainer` reads (LoRA on, no gradient checkpointing)."""
    return SimpleNamespace(
        **{k: v for k, v in t.items() if k != "shape"},
        model_shape=t["shape"],
        compression_ratio=8,
        lora=True,
        grad_ckpt=False,
    )


def section_train_step(run: Run, res: dict) -> None:
    from ngc_trl.models import char_tokenizer

    t = run.cfg["train_step"]
    ns, dev = train_namespace(t), run.device.type  # train_step compares the device with "cuda"
    res["settings"] = {
        **t,
        "lora": "r 64, alpha 128, all linear layers",
        "dtype": str(run.dtype),
        "loss_phase": "_compute_loss(...).backward() on the same NGC rollouts, median of repeats",
        "step": "trainer.train() steps, first dropped",
    }

    def build(kind):  # -> trainer, seconds, CUDA bytes allocated once it is built (None on CPU)
        free_cuda()
        t0 = time.perf_counter()
        with weights_built_on_device():
            trainer = train_bench.make_trainer(kind, ns, char_tokenizer(), dev, run.dtype)
        return trainer, time.perf_counter() - t0, torch.cuda.memory_allocated() if dev == "cuda" else None

    ngc, build_s, weights = build("ngc")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    batch = ngc._generate_and_score_completions(
        [{"prompt": ngc.train_dataset[0]["prompt"]}] * t["batch_size"]
    )
    rollout_s = time.perf_counter() - t0
    plain = {k: v for k, v in batch.items() if not k.startswith("ngc_")}
    t0 = time.perf_counter()
    ngc_loss, ngc_loss_mem = train_bench.time_loss_phase(ngc, batch, dev, t["repeats"])
    loss_s = time.perf_counter() - t0
    res["loss_phase"] = {"ngc_s": ngc_loss, "ngc_peak_bytes": ngc_loss_mem, "ngc_weights_bytes": weights}
    res["rounds_per_rollout"] = float((batch["ngc_positions"] >= 0).sum(1).float().mean())
    res["ngc_rollout_s"] = rollout_s
    run.flush()
    step_est = (
        (t["steps"] + 1) * (rollout_s + 2 * ngc_loss) * 1.3
    )  # per trainer; vanilla generate is no faster
    need = build_s + loss_s + 2 * step_est
    do_steps = run.left() > need
    res["step"] = {} if do_steps else {"skipped": {"predicted_s": need, "left_s": run.left()}}
    if do_steps:
        res["step"]["ngc_s"], res["step"]["ngc_peak_bytes"] = train_bench.time_steps(ngc, dev)
    ngc.accelerator.free_memory()
    del ngc  # one model on the GPU at a time: comparable peaks
    van, _, weights = build("vanilla")
    van_loss, van_loss_mem = train_bench.time_loss_phase(van, plain, dev, t["repeats"])
    res["loss_phase"].update(
        vanilla_s=van_loss,
        vanilla_peak_bytes=van_loss_mem,
        vanilla_weights_bytes=weights,
        ratio=ngc_loss / van_loss,
    )
    if do_steps:
        res["step"]["vanilla_s"], res["step"]["vanilla_peak_bytes"] = train_bench.time_steps(van, dev)
        res["step"]["ratio"] = res["step"]["ngc_s"] / res["step"]["vanilla_s"]
    van.accelerator.free_memory()
    del van
    ratio = res["step"].get("ratio")
    res["targets"] = {
        "ngc_loss_phase_le_1.15x_vanilla": res["loss_phase"]["ratio"] <= 1.15,
        "ngc_step_le_1.15x_vanilla": None if ratio is None else ratio <= 1.15,
    }


# -------------------------------------------------------------------------------------- 4. fixed budget
def section_fixed_budget(run: Run, res: dict) -> None:
    d = run.cfg["decode"]
    n, b_full = d["fixed_length"], d["fixed_batch"]
    res["settings"] = {
        "length": n,
        "full_batch": b_full,
        "max_ngc_batch": run.args.max_fixed_batch,
        "budget": "full cache's cache_stats.peak_bytes at (full_batch, length)",
        "per_sequence": "peak_kv_bytes / batch of the decode cells at (full_batch, length)",
    }
    ns = decode_namespace({**d, "lengths": [n]}, b_full, run.args.seed)
    cells, warmed, rate = {}, set(), rates_of(run.decode_rows)
    for policy in ("full", "ngc"):  # reuse the decode section's cells of this batch and length
        hit = [
            r
            for r in run.decode_rows
            if r["policy"] == policy and r["length"] == n and r["batch_size"] == b_full
        ]
        est = None if hit else predict_s(rate, policy, n, ns.lengths[0])
        if est is not None and est > run.left():
            res["skipped"] = {"cell": f"{policy} at batch {b_full}", "predicted_s": est, "left_s": run.left()}
            res["targets"] = {"sequences_ge_2x": None, "tokens_per_s_ge_1.8x": None}
            return
        cells[policy] = hit[0] if hit else timed_cell(run, ns, policy, n, warmed)
        rate = rates_of([*run.decode_rows, *cells.values()])
        run.flush()
    full, ngc = cells["full"], cells["ngc"]
    res["reused_decode_cells"] = any(r is full for r in run.decode_rows)
    budget = full["peak_kv_bytes"]
    per_seq = {k: c["peak_kv_bytes"] / b_full for k, c in cells.items()}
    fit = {k: max(1, math.floor(budget / v)) for k, v in per_seq.items()}
    fit["ngc"] = min(fit["ngc"], run.args.max_fixed_batch)
    res.update(
        budget_bytes=budget,
        per_sequence_peak_kv_bytes=per_seq,
        sequences_fit=fit,
        sequences_ratio=fit["ngc"] / fit["full"],
        full={
            "batch": b_full,
            "tokens_per_s": full["tokens_per_s"],
            "peak_kv_bytes": full["peak_kv_bytes"],
            "wall_s": full["wall_s"],
        },
    )
    # rough: decode is partly launch-bound, so time grows slower than the batch; + the warm-up at that batch
    est = ngc["wall_s"] * max(1.0, 0.5 * fit["ngc"] / b_full) * 1.2 * (1 + ns.lengths[0] / n)
    if est > run.left():
        res["ngc_at_fit"] = {"skipped": {"predicted_s": est, "left_s": run.left()}}
        tps_ratio = None
    else:
        row = timed_cell(
            run, decode_namespace({**d, "lengths": [n]}, fit["ngc"], run.args.seed), "ngc", n, set()
        )
        res["ngc_at_fit"] = {
            "batch": fit["ngc"],
            "tokens_per_s": row["tokens_per_s"],
            "wall_s": row["wall_s"],
            "peak_kv_bytes": row["peak_kv_bytes"],
            "fits_budget": row["peak_kv_bytes"] <= budget,
            "eviction_share": row["eviction_share"],
            "cuda_peak_delta_bytes": row["cuda_peak_delta_bytes"],
        }
        tps_ratio = row["tokens_per_s"] / full["tokens_per_s"]
    res["tokens_per_s_ratio"] = tps_ratio
    res["targets"] = {
        "sequences_ge_2x": res["sequences_ratio"] >= 2.0,
        "tokens_per_s_ge_1.8x": None if tps_ratio is None else tps_ratio >= 1.8,
    }


# ---------------------------------------------------------------------------------------------------- main
RUNNERS = {
    "replay_parity": section_replay_parity,
    "decode": section_decode,
    "train_step": section_train_step,
    "fixed_budget": section_fixed_budget,
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
