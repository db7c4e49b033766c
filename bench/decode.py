"""Decode benchmark: throughput and peak KV cache of `generate_with_eviction` for every policy.

A Qwen2 with random weights is built from a config (no download). For each generation length and
policy, one batch of random prompts decodes exactly ``length`` tokens (greedy, EOS disabled) under the
δ / ε / b schedule. We report wall time, tokens/s, peak K+V bytes, peak entries, the share of time spent
in eviction rounds, and, against the ``full`` cache of the same batch and length, the ratios and two
targets: eviction rounds ≤ 5% of decode time, and peak KV bytes = full peak / schedule compression
within 5% (the schedule's peak is computed analytically from `EvictionConfig`).

``breadcrumbs`` (Breadcrumbs beacon decoding, `ngc_trl.breadcrumbs.beacons`) is a variant of the same table: one
beacon every ``--compression_ratio`` generated tokens (its id: the last of the random vocabulary),
no δ/ε/b rounds; its "eviction" time is the window drops, its tokens/s counts completion tokens only
(beacon forwards are overhead), and its expected peak is prompt + beacons + one window (+ the beacon).
Its window drops happen in place, so its allocated storage is that peak rounded up to the cache's growth
step (16 slots): on short runs the bytes target can miss by that step while the entries match exactly.

CPU (default; tiny model, batch 4, lengths 256,1024, δ=64; ~2 min on 2 cores)::

    python bench/decode.py --out outputs/bench/decode.json
    python bench/decode.py --lengths 128 --policies full,ngc,knorm --out /tmp/decode.json  # smoke run
    python bench/decode.py --lengths 128 --policies breadcrumbs --compression_ratio 8 --out /tmp/bc.json

GPU (DeepSeek-R1-Distill-Qwen-1.5B shape, bf16, δ=256)::

    python bench/decode.py --model_shape r1-1.5b --device cuda --lengths 1024,8192 --batch_size 16 \
        --out outputs/bench/decode_r1.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from ngc_trl.engine.config import BeaconConfig, EvictionConfig
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.policies import POLICIES, get_policy

BEACONS = "breadcrumbs"  # Breadcrumbs beacon decoding (a BeaconConfig), benchmarked beside the score rules
NAMES = [*POLICIES, BEACONS]

SHAPES = {  # name -> (Qwen2Config kwargs, default δ, default batch size)
    "tiny": (
        dict(
            num_hidden_layers=4,
            hidden_size=256,
            intermediate_size=768,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
        64,
        4,
    ),
    "r1-1.5b": (
        dict(
            num_hidden_layers=28,
            hidden_size=1536,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            head_dim=128,
            vocab_size=151936,
            rope_theta=10000.0,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
        256,
        16,
    ),
}
TOLERANCE = 0.05  # both targets: eviction share ≤ 5%, peak-bytes ratio within 5% of the schedule's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--policies", default=",".join(NAMES), help="comma list; `full` is always added")
    p.add_argument("--lengths", default="256,1024", help="generated tokens per sequence, comma list")
    p.add_argument("--batch_size", type=int, default=None, help="default: 4 (tiny), 16 (r1-1.5b)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--eviction_interval", type=int, default=None, help="δ; default: 64 (tiny), 256 (r1-1.5b)")
    p.add_argument("--eviction_rate", type=float, default=0.5)
    p.add_argument("--block_size", type=int, default=32)
    p.add_argument("--compression_ratio", type=int, default=8, help="c of the breadcrumbs variant")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench/decode.json")
    args = p.parse_args(argv)
    shape_kw, delta, batch = SHAPES[args.model_shape]
    args.eviction_interval = args.eviction_interval or delta
    args.batch_size = args.batch_size or batch
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    names = [x for x in args.policies.split(",") if x]
    unknown = set(names) - set(NAMES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; valid: {', '.join(NAMES)}")
    args.policies = ["full"] + [x for x in dict.fromkeys(names) if x != "full"]
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    return args


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int):
    """Random-weight Qwen2 of the given shape, created directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape][0])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def schedule_peak(cfg: EvictionConfig, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(peak live entries per layer that the schedule implies, entries of a full cache). Rounds keep
    ``K`` whole blocks (exact when δ and the prompt are multiples of b; else an upper bound)."""
    total = prompt_len + new_tokens
    n = peak = fed = prompt_len
    for p in cfg.round_positions(prompt_len, total):
        n, fed = n + p - fed, p
        peak = max(peak, n)
        n = min(n, cfg.num_kept_blocks(math.ceil(n / cfg.block_size)) * cfg.block_size)
    n += total - 1 - fed  # the last generated token is never fed
    return max(peak, n), total - 1


def beacon_peak(c: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(peak live entries per layer under beacon decoding, entries of a full cache): the loop feeds
    ``t_1 .. t_{n-1}``; ``t_i`` with ``i - 1 > 0`` and ``(i - 1) mod c == 0`` is fed together with the beacon
    closing the window before it (one forward), then the window's ``c`` entries are dropped."""
    live = peak = prompt_len
    for i in range(1, new_tokens):
        due = i - 1 > 0 and (i - 1) % c == 0
        live += 1 + due
        peak = max(peak, live)
        live -= c * due
    return peak, prompt_len + new_tokens - 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(model, ids, cfg, length, device):
    """One timed `generate_with_eviction` call; returns (seconds, output, cuda peak bytes or None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = generate_with_eviction(
        model,
        ids,
        torch.ones_like(ids),
        eviction=cfg,
        max_new_tokens=length,
        do_sample=False,
        eos_token_id=[],
    )
    sync(device)
    wall = time.perf_counter() - t0
    assert out.sequences.shape[1] == ids.shape[1] + length, "EOS must be disabled"
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return wall, out, mem


def decode_kernel(device) -> str:
    """The kernel `ngc_trl.engine.attention` uses for bf16/fp16 CUDA decode (h2o always uses masked SDPA)."""
    import importlib.util

    if device.type != "cuda":
        return "sdpa (masked)"
    if importlib.util.find_spec("flash_attn"):
        return "flash_attn_with_kvcache"
    return "torch varlen_attn" if importlib.util.find_spec("torch.nn.attention.varlen") else "sdpa (masked)"


def machine_info(device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "decode_kernel": decode_kernel(device),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def bench_cell(model, args, policy, length, device, warmed: set) -> dict:
    vocab = model.config.vocab_size
    crumbs = policy == BEACONS
    if crumbs:
        cfg = BeaconConfig(beacon_token_id=vocab - 1, compression_ratio=args.compression_ratio)
    else:
        cfg = EvictionConfig(
            policy=policy,
            eviction_interval=args.eviction_interval,
            eviction_rate=args.eviction_rate,
            block_size=args.block_size,
        )
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.batch_size, args.prompt_len), generator=g).to(device)
    if policy not in warmed:  # one warmup per policy (kernels, allocator), at the shortest length
        run_once(model, ids, cfg, min(args.lengths), device)
        warmed.add(policy)
    walls, out, mem = [], None, None
    for _ in range(args.repeats):
        wall, out, mem = run_once(model, ids, cfg, length, device)
        walls.append(wall)
    wall = statistics.median(walls)
    st = out.cache_stats
    n_layers = st.peak_entries.shape[1]
    if crumbs:
        peak, full = beacon_peak(args.compression_ratio, args.prompt_len, length)
    else:
        peak, full = schedule_peak(cfg, args.prompt_len, length)
        peak = peak if get_policy(cfg).evicts else full
    return {
        "length": length,
        "policy": policy,
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "wall_s": wall,
        "wall_s_runs": walls,
        "tokens_per_s": args.batch_size * length / wall,
        "eviction_time_s": out.eviction_time,
        "eviction_share": out.eviction_time / wall,
        "rounds": int((out.records.positions[0] >= 0).sum()),
        "compression_ratio": args.compression_ratio if crumbs else None,
        "beacons": max(length - 2, 0) // args.compression_ratio if crumbs else 0,
        "peak_kv_bytes": int(st.peak_bytes),
        "peak_entries_per_layer": st.peak_entries.max(0).values.tolist(),
        "peak_entries_total": int(st.peak_total.max()),
        "full_entries_total": int(st.full_entries.max()) * n_layers,
        "compression": float(st.compression.mean()),
        "schedule_peak_entries_per_layer": peak,
        "schedule_full_entries_per_layer": full,
        "expected_bytes_ratio": peak / full,
        "cuda_max_memory_allocated": mem,
    }


def add_ratios(rows: list[dict]):
    """Ratios vs ``full`` at the same length (same batch and run), and the two targets."""
    full = {r["length"]: r for r in rows if r["policy"] == "full"}
    for r in rows:
        f = full[r["length"]]
        r["tokens_per_s_ratio"] = r["tokens_per_s"] / f["tokens_per_s"]
        r["peak_kv_bytes_ratio"] = r["peak_kv_bytes"] / f["peak_kv_bytes"]
        r["peak_entries_ratio"] = r["peak_entries_total"] / max(r["full_entries_total"], 1)
        r["targets"] = {
            "eviction_share_le_5pct": r["eviction_share"] <= TOLERANCE,
            "peak_bytes_match_schedule_5pct": abs(r["peak_kv_bytes_ratio"] / r["expected_bytes_ratio"] - 1)
            <= TOLERANCE,
        }


def print_table(rows: list[dict]):
    head = (
        f"{'len':>6} {'policy':<14} {'wall s':>8} {'tok/s':>9} {'x full':>6} {'KV MiB':>8} "
        f"{'bytes':>6} {'expect':>6} {'evict%':>6}  targets"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ok = "".join("ok " if v else "NO " for v in r["targets"].values())
        print(
            f"{r['length']:>6} {r['policy']:<14} {r['wall_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['tokens_per_s_ratio']:>6.2f} {r['peak_kv_bytes'] / 2**20:>8.2f} {r['peak_kv_bytes_ratio']:>6.3f} "
            f"{r['expected_bytes_ratio']:>6.3f} {100 * r['eviction_share']:>6.2f}  {ok}"
        )
    print("targets: eviction share ≤ 5% | peak KV bytes / full within 5% of 1/schedule compression")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = build_model(args.model_shape, args.device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    print(
        f"{args.model_shape}: {n_params / 1e6:.1f}M params, {args.dtype}, {device}, batch {args.batch_size}, "
        f"prompt {args.prompt_len}, δ={args.eviction_interval}, ε={args.eviction_rate}, b={args.block_size}"
    )
    rows, warmed, t0 = [], set(), time.perf_counter()
    for length in args.lengths:
        for policy in args.policies:
            rows.append(bench_cell(model, args, policy, length, device, warmed))
            print(f"  len {length:>6} {policy:<14} {rows[-1]['wall_s']:.2f}s", flush=True)
    add_ratios(rows)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(
        model_config=SHAPES[args.model_shape][0],
        n_params=n_params,
        cuda_bytes_after_model=weights,
        greedy=True,
        eos="disabled",
        warmup="one run per policy at the shortest length",
        timing="median of repeats",
    )
    report = {
        "benchmark": "decode",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(device),
        "settings": settings,
        "total_s": time.perf_counter() - t0,
        "results": rows,
    }
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
