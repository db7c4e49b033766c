"""Benchmark: how the block-score -> logit rule shapes the *training-time* eviction policy.

For each setting (``transform:scale``, e.g. ``none:1`` = the paper's raw block means) on one model and one
set of training-distribution prompts (never the test split), it measures, in one run:

* ``sampled_reward``: mean task reward of rollouts whose tokens are sampled (temperature 1) and whose
  evictions are drawn by Gumbel-top-k, i.e. what GRPO trains on;
* ``topk_reward``: the same rollouts' setting with deterministic top-k evictions (what evaluation judges);
* ``entropy_ratio``: first-draw entropy of the eviction actions / log N (1 = uniform);
* ``grad_ratio``: ‖∇L_mem‖ / ‖∇L_token‖ on the q/k projections, for one batch of G rollouts per prompt
  with Dr. GRPO advantages, L_mem normalised as in `NGCTrainer` (docs/method.md §5.1).

Example::

    python bench/eviction_logits.py --model outputs/tiny-base --rate 0.5 --settings none:1,log:1,relative:1 \\
        --out bench/results/eviction_logits.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ngc_trl.engine.attention import no_mask, use_ngc_attention
from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.generation import generate_with_eviction
from ngc_trl.engine.replay import ReplayContext
from ngc_trl.models import load_tokenizer
from ngc_trl.tasks import get_task


def parse_settings(value: str) -> list[tuple[str, float]]:
    out = []
    for item in value.split(","):
        transform, _, scale = item.strip().partition(":")
        out.append((transform, float(scale or 1.0)))
    return out


def rollouts(model, tok, prompts, cfg, rate, max_new, sample_evictions, seed, batch):
    """Sampled-token rollouts of ``prompts``; returns ``(texts, [(encoded prompts, EvictionOutput)] per chunk)``."""
    texts, outs = [], []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True, padding_side="left")
        out = generate_with_eviction(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            cfg,
            max_new_tokens=max_new,
            do_sample=True,
            temperature=1.0,
            sample_evictions=sample_evictions,
            generator=gen,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            eviction_rate=torch.full((enc["input_ids"].shape[0],), rate),
        )
        texts += tok.batch_decode(out.sequences[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        outs.append((enc, out))
    return texts, outs


def completion_mask(comp: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``(B, T)`` bool: completion tokens up to and including the first EOS."""
    is_eos = (comp == eos_id).int()
    return (is_eos.cumsum(1) - is_eos) == 0


def grad_ratio(model, enc, out, rewards, cfg, group, max_new):
    """‖∇L_mem‖ / ‖∇L_token‖ over q_proj and k_proj weights for one rollout chunk."""
    seq = out.sequences
    p = enc["input_ids"].shape[1]
    comp = seq[:, p:]
    comp_mask = completion_mask(comp, model.generation_config.eos_token_id)
    am = torch.cat([enc["attention_mask"], comp_mask.long()], 1)
    r = rewards.view(-1, group)
    adv = (r - r.mean(1, keepdim=True)).view(-1)
    ctx = ReplayContext(am, out.records, cfg, prompt_len=enc["attention_mask"].sum(1))
    with use_ngc_attention(model):
        logits = model(
            input_ids=seq, attention_mask=no_mask(model), position_ids=ctx.position_ids, ngc_replay=ctx
        ).logits
    lp = torch.log_softmax(logits[:, p - 1 : -1].float(), -1).gather(-1, comp[..., None])[..., 0]
    b = seq.shape[0]
    l_tok = -(lp * comp_mask * adv[:, None]).sum() / (b * max_new)
    ev = ctx.eviction_logp(model.config.num_hidden_layers)
    m = out.records.acted.float()
    l_mem = -((ev * m).sum(1) / m.sum(1).clamp(min=1)).sum(-1).mul(adv).sum() / (b * max_new)
    params = [w for n, w in model.named_parameters() if "q_proj.weight" in n or "k_proj.weight" in n]
    g_tok = torch.autograd.grad(l_tok, params, retain_graph=True)
    g_mem = torch.autograd.grad(l_mem, params, allow_unused=True)
    norm = lambda gs: math.sqrt(sum(float((g**2).sum()) for g in gs if g is not None))  # noqa: E731
    return norm(g_mem), norm(g_tok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="outputs/tiny-base")
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--data_source", default="generated:testbed")
    ap.add_argument("--num_prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--settings", default="none:1,log:1,relative:1,relative:2")
    ap.add_argument("--eviction_interval", type=int, default=64)
    ap.add_argument("--block_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=576)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--grad_prompts", type=int, default=8, help="prompts (x group) of the gradient batch")
    ap.add_argument(
        "--seed", type=int, default=1234, help="training-distribution prompts, not the test split"
    )
    ap.add_argument("--out", default="outputs/bench/eviction_logits.json")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = load_tokenizer(a.model)
    task = get_task(a.task)
    ds = task.load(a.data_source, n=a.num_prompts, seed=a.seed, split="train", prompt_format="plain")
    rows = [dict(r) for r in ds]
    prompts = [r["prompt"] for r in rows for _ in range(a.group)]
    prow = [r for r in rows for _ in range(a.group)]
    results = []
    for transform, scale in parse_settings(a.settings):
        cfg = EvictionConfig(
            eviction_interval=a.eviction_interval,
            eviction_rate=a.rate,
            block_size=a.block_size,
            policy="ngc",
            logit_transform=transform,
            logit_scale=scale,
        )
        row = {"transform": transform, "scale": scale}
        t0 = time.perf_counter()
        for name, sample in (("sampled", True), ("topk", False)):
            with torch.no_grad():
                texts, outs = rollouts(
                    model, tok, prompts, cfg, a.rate, a.max_new_tokens, sample, a.seed, a.batch_size
                )
            rewards = torch.tensor([task.score(t, r) for t, r in zip(texts, prow)])
            row[f"{name}_reward"] = round(float(rewards.mean()), 4)
            row[f"{name}_reward_se"] = round(float(rewards.std() / math.sqrt(len(rewards))), 4)
            if sample:
                sampled_outs, sampled_rewards = outs, rewards
        # first-draw entropy over log N, from a no-grad replay of the sampled rollouts' first chunk
        enc, out = sampled_outs[0]
        n = a.grad_prompts * a.group
        sub = out.records.select(slice(0, n))
        sel_enc = {k: v[:n] for k, v in enc.items()}
        sel_out = type(out)(**{**out.__dict__, "sequences": out.sequences[:n], "records": sub})
        model.zero_grad()
        g_mem, g_tok = grad_ratio(
            model, sel_enc, sel_out, sampled_rewards[:n], cfg, a.group, a.max_new_tokens
        )
        row["grad_norm_mem"], row["grad_norm_token"] = g_mem, g_tok
        row["grad_ratio"] = g_mem / max(g_tok, 1e-30)
        with torch.no_grad():
            seq = sel_out.sequences
            p = sel_enc["input_ids"].shape[1]
            am = torch.cat(
                [
                    sel_enc["attention_mask"],
                    completion_mask(seq[:, p:], model.generation_config.eos_token_id).long(),
                ],
                1,
            )
            ctx = ReplayContext(am, sub, cfg, prompt_len=sel_enc["attention_mask"].sum(1))
            with use_ngc_attention(model):
                model(
                    input_ids=seq,
                    attention_mask=no_mask(model),
                    position_ids=ctx.position_ids,
                    ngc_replay=ctx,
                )
            ent = ctx.eviction_entropy(model.config.num_hidden_layers)
            acted = sub.acted
            log_n = torch.log(sub.n_blocks.clamp(min=2).float())
            row["entropy_ratio"] = round(float((ent / log_n)[acted].mean()), 5) if acted.any() else None
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    meta = {
        "model": a.model,
        "rate": a.rate,
        "num_prompts": a.num_prompts,
        "group": a.group,
        "eviction_interval": a.eviction_interval,
        "block_size": a.block_size,
        "seed": a.seed,
        "command": "python bench/eviction_logits.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
