"""The four sections of `bench/gpu_check.py`, one function each (``section_<name>(run, res)``): it reads the
shared run state (`gpu_check.Run`: settings, device, dtype, the seconds left, the decode model built once) and
fills its part of the report, ``res``, with settings, measurements and ``targets``.

1. replay parity: flex vs dense replays of a sampled NGC rollout of the random `PARITY_MODEL`, fp32 and bf16,
   forward and backward, with the smallest of `TOLS` that bounds each difference;
2. decode: `bench/decode.py`'s cells, timed, with the CUDA peak delta, skipped when predicted (`predict_s`)
   to overrun;
3. train step: `bench/train_step.py`'s loss phase and ``trainer.train()`` steps, NGCTrainer vs GRPOTrainer;
4. fixed budget: how many sequences each method fits in the full cache's peak KV bytes, NGC run at its batch.

The CLI, the time budget and the JSON report are `bench/gpu_check.py`'s.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.engine.replay import ReplayContext, replay_forward

if (
    str(Path(__file__).resolve().parent) not in sys.path
):  # the sibling benchmarks (`python bench/x.py` adds it)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as decode_bench  # noqa: E402
import train_step as train_bench  # noqa: E402

if TYPE_CHECKING:
    from gpu_check import Run

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


# ------------------------------------------------------------------------------------------------ helpers
def tolerance(x: float | None) -> float | None:
    """The smallest tolerance of `TOLS` that bounds ``x`` (None if none does, or ``x`` is not finite)."""
    if x is None or not math.isfinite(x):
        return None
    return next((t for t in TOLS if x <= t), None)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in fp32 over same-shaped tensors (0 when empty)."""
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
