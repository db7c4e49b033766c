"""Benchmark: is the hindsight oracle predictable from the present state? A probe scorer fitted to it.

The `oracle` ceiling (evaluation-only) keeps the blocks the *rest* of the full-cache completion attends to
most. Its headroom over the heuristics and the ngc scorer (tiny testbed, validation: 35.9% vs 23.4%) is
only reachable by a learned policy if what it keeps can be read off what a decoder *has* at the round.
`bench/oracle_cloning.py` asks whether the ngc scorer (the model's own attention) can be moved there; this
probe asks the prior question with the language model frozen and a richer, separate scorer:

1. the oracle decodes training problems greedily with top-k eviction; at every (rollout, round, layer) that
   evicts, every live key's present-state features are recorded (`key_features`: the attention of each
   head and window query, their logs, key and value norms per KV head, prompt / age / recency / first-block
   indicators), with the oracle's block scores and its keep budget ``K``;
2. a per-layer head (linear, or a one-hidden-layer MLP) maps a key's features to a score; block scores are
   the block mean, as for every policy, and the head is fitted by the Plackett–Luce log-likelihood of the
   oracle's top-``K`` (in its order), the loss of `bench/oracle_cloning.py` without the language model;
3. the fitted head decodes the validation problems as a score rule (``probe``, registered only while this
   runs) next to ``full``, ``ngc`` and ``oracle``, by `ngc-eval` (greedy, top-k, the same schedule).

Reported: the top-``K`` agreement with the oracle on held-out decisions (probe, the ngc score, a uniform
draw) and accuracy under eviction. A probe near the oracle says a separate scoring head could learn what
the reward points to; a probe level with ngc says the oracle's headroom is hindsight the present state does
not carry (at this model size). Not a method of this project and not in the paper; the states are the
oracle's own (a probe decoding on its own drifts from them, so agreement is an optimistic measure and
accuracy is the one that counts). Example::

    python bench/oracle_probe.py --model outputs/tiny-base --train_problems 256 --hidden 0,64 \\
        --out bench/results/oracle_probe_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import ClassVar

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ngc_trl.engine.decision import num_kept  # noqa: E402
from ngc_trl.engine.policy import EvictionPolicy, LayerView  # noqa: E402
from ngc_trl.engine.sampling import plackett_luce_log_prob  # noqa: E402
from ngc_trl.engine.scoring import head_query_mean, reduce_blocks  # noqa: E402
from ngc_trl.policies.oracle import OraclePolicy  # noqa: E402


def key_features(view: LayerView, window: int) -> torch.Tensor:
    """``(R, S, F)`` present-state features of every slot of one layer at a round (0 on non-live slots).

    ``F = H·w + 1 + H + 2·H_kv + 5``: the attention of each head and each of the ``w`` window queries on the
    key (the ngc scorer averages exactly these), the log of their head-and-query mean and of each head's
    mean, the key and value norm per KV head, and five position features: in the prompt, age / ``p``,
    log(1 + age), among the 32 newest live keys, among the 8 oldest (``p``: the round's position, the token
    fed next).
    """
    probs, qv = view.window_probs(window)  # (R, H, w, S)
    r, h, w, s = probs.shape
    attn = probs.permute(0, 3, 1, 2).reshape(r, s, h * w)
    mean = head_query_mean(probs, qv)  # (R, S)
    qw = qv.to(probs.dtype)[:, None, :, None]
    per_head = (probs * qw).sum(2) / qw.sum(2).clamp(min=1)  # (R, H, S)
    logs = torch.log(torch.cat([mean[:, None], per_head], 1) + 1e-6).transpose(1, 2)  # (R, S, 1 + H)
    knorm = view.keys.float().norm(dim=-1).transpose(1, 2)  # (R, S, H_kv)
    vnorm = view.values.float().norm(dim=-1).transpose(1, 2)
    live = view.live
    p = (view.q_pos[:, -1:] + 1).float()  # the round's position (the last window query is at p - 1)
    age = (p - view.pos.float()).clamp(min=0)
    rank = torch.cumsum(live.long(), -1) - 1
    from_end = live.long().sum(-1, keepdim=True) - torch.cumsum(live.long(), -1)
    position = torch.stack(
        [
            (view.pos < view.prompt_len[:, None]).float(),
            age / p.clamp(min=1),
            torch.log1p(age),
            (from_end < 32).float(),
            (rank < 8).float(),
        ],
        -1,
    )
    f = torch.cat([attn, logs, knorm, vnorm, position], -1)
    return f.masked_fill(~live[..., None], 0.0)


def feature_names(heads: int, window: int, kv_heads: int) -> list[str]:
    """Names of the ``F`` columns of `key_features`, in order."""
    return (
        [f"attn_h{h}_q{q}" for h in range(heads) for q in range(window)]
        + ["log_attn_mean"]
        + [f"log_attn_h{h}" for h in range(heads)]
        + [f"key_norm_kv{g}" for g in range(kv_heads)]
        + [f"value_norm_kv{g}" for g in range(kv_heads)]
        + ["in_prompt", "age_frac", "log1p_age", "newest32", "oldest8"]
    )


@dataclasses.dataclass
class Decision:
    """One evicting (rollout, round, layer): ``feats (S, F)`` of its live keys in temporal order, ``bid (S,)``
    their block ids, ``oracle (N,)`` the oracle's block scores, ``ngc (N,)`` the ngc scorer's, ``k`` blocks kept."""

    layer: int
    feats: torch.Tensor
    bid: torch.Tensor
    oracle: torch.Tensor
    ngc: torch.Tensor
    k: int


class RecordingOracle(OraclePolicy):
    """The oracle's scores, unchanged, plus a `Decision` per evicting row appended to ``sink`` (no
    protections: the paper's protocol, every existing block a candidate)."""

    def __init__(self, cfg, hindsight, window: int, sink: list):
        super().__init__(cfg, hindsight)
        self.window, self.sink = window, sink

    @property
    def query_window(self) -> int:
        return self.window  # keep the queries the features need; the oracle's decisions do not read them

    def token_scores(self, view: LayerView) -> torch.Tensor:
        scores = super().token_scores(view)
        feats = key_features(view, self.window)
        probs, qv = view.window_probs(self.cfg.score_window)
        ngc = head_query_mean(probs, qv)
        n_blocks = (view.live.sum(-1) + self.cfg.block_size - 1) // self.cfg.block_size
        n_max = max(int(n_blocks.max()), 1)
        o_blocks, _, _ = reduce_blocks(scores, view.bid, n_max, self.cfg.block_reduction)
        ngc_blocks = reduce_blocks(ngc, view.bid, n_max, self.cfg.block_reduction)[0]
        rate = torch.full((len(n_blocks),), self.cfg.eviction_rate, dtype=torch.float64)
        ks = num_kept(n_blocks, rate)
        for i in range(len(n_blocks)):
            n, k = int(n_blocks[i]), int(ks[i])
            if k >= n:
                continue
            live = view.live[i]
            self.sink.append(
                Decision(
                    int(view.layer_idx),
                    feats[i, live].cpu(),
                    view.bid[i, live].cpu(),
                    o_blocks[i, :n].cpu(),
                    ngc_blocks[i, :n].cpu(),
                    k,
                )
            )
        return scores


@torch.no_grad()
def collect(model, tok, problems, cfg, window: int, max_new_tokens: int, batch_size: int) -> list[Decision]:
    """The oracle's evicting decisions (with features) on greedy top-k decodes of ``problems``."""
    from ngc_trl.engine.generation import generate_with_eviction
    from ngc_trl.policies.oracle import oracle_for_batch

    oracle_cfg = dataclasses.replace(cfg, policy="oracle")
    sink: list[Decision] = []
    model.eval()
    for i in range(0, len(problems), batch_size):
        enc = tok(
            [p["prompt"] for p in problems[i : i + batch_size]],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        ids, am = enc["input_ids"], enc["attention_mask"]
        eos, pad = tok.eos_token_id, tok.pad_token_id
        oracle, _ = oracle_for_batch(model, ids, am, oracle_cfg, [None] * len(ids), max_new_tokens, eos, pad)
        rec = RecordingOracle(oracle_cfg, oracle.data, window, sink)
        generate_with_eviction(
            model,
            ids,
            am,
            eviction=oracle_cfg,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            policy=rec,
        )
    return sink


class Head(torch.nn.Module):
    """Per-layer key scorer on standardized features: linear (``hidden = 0``) or one hidden SiLU layer."""

    def __init__(self, n_layers: int, n_features: int, hidden: int, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)  # (L, F)
        self.register_buffer("std", std)
        self.hidden = hidden
        if hidden:
            self.w1 = torch.nn.Parameter(torch.randn(n_layers, n_features, hidden) / math.sqrt(n_features))
            self.b1 = torch.nn.Parameter(torch.zeros(n_layers, hidden))
            self.w2 = torch.nn.Parameter(torch.zeros(n_layers, hidden))
        else:
            self.w = torch.nn.Parameter(torch.zeros(n_layers, n_features))

    def forward(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``feats (..., F)`` of layer ``layer`` -> ``(...)`` key scores."""
        x = (feats - self.mean[layer]) / self.std[layer]
        if self.hidden:
            return torch.nn.functional.silu(x @ self.w1[layer] + self.b1[layer]) @ self.w2[layer]
        return x @ self.w[layer]


def _batch(decisions: list[Decision]):
    """Pad one layer's decisions: feats ``(D, S, F)``, bid ``(D, S)`` (-1 pad), oracle order ``(D, N)``
    (the top-``K`` block ids by oracle score, descending, -1 pad), pool ``(D, N)``, k ``(D,)``."""
    d = len(decisions)
    s = max(x.feats.shape[0] for x in decisions)
    n = max(x.oracle.shape[0] for x in decisions)
    f = decisions[0].feats.shape[1]
    feats = torch.zeros(d, s, f)
    bid = torch.full((d, s), -1, dtype=torch.long)
    order = torch.full((d, n), -1, dtype=torch.long)
    pool = torch.zeros(d, n, dtype=torch.bool)
    for i, x in enumerate(decisions):
        feats[i, : x.feats.shape[0]] = x.feats
        bid[i, : x.bid.shape[0]] = x.bid
        order[i, : x.k] = torch.argsort(x.oracle, descending=True, stable=True)[: x.k]
        pool[i, : x.oracle.shape[0]] = True
    return feats, bid, order, pool, torch.tensor([x.k for x in decisions])


def block_scores(head: Head, layer: int, feats, bid, n: int) -> torch.Tensor:
    """The head's key scores reduced to block means, as every policy's are: ``(D, N)``."""
    return reduce_blocks(head(layer, feats), bid, n, "mean")[0]


def fit(decisions: list[Decision], n_layers: int, hidden: int, steps: int, lr: float, seed: int = 0) -> Head:
    """Fit a `Head` by the Plackett–Luce log-likelihood of the oracle's top-``K`` (full batch, Adam)."""
    torch.manual_seed(seed)
    by_layer = [_batch([x for x in decisions if x.layer == layer]) for layer in range(n_layers)]
    stats = []
    for feats, bid, *_ in by_layer:
        live = feats[bid >= 0]
        stats.append((live.mean(0), live.std(0).clamp(min=1e-6)))
    head = Head(n_layers, by_layer[0][0].shape[-1], hidden, *map(torch.stack, zip(*stats)))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = 0.0
        for layer, (feats, bid, order, pool, _) in enumerate(by_layer):
            logits = block_scores(head, layer, feats, bid, pool.shape[1])
            loss = loss - plackett_luce_log_prob(logits, order, pool).sum()
        loss = loss / len(decisions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


@torch.no_grad()
def agreement(decisions: list[Decision], head: Head | None) -> float:
    """Mean ``|top-K(scores) ∩ top-K(oracle)| / K`` over ``decisions``; ``head=None``: the ngc scores."""
    total = 0.0
    for x in decisions:
        n = x.oracle.shape[0]
        if head is None:
            scores = x.ngc
        else:
            scores = block_scores(head, x.layer, x.feats[None], x.bid[None], n)[0]
        ours = set(torch.topk(scores, x.k).indices.tolist())
        theirs = set(torch.topk(x.oracle, x.k).indices.tolist())
        total += len(ours & theirs) / x.k
    return total / max(len(decisions), 1)


class ProbePolicy(EvictionPolicy):
    """``s_t = head_ℓ(key_features(t))``: a fitted probe as a score rule (`probe_policy` makes one per head)."""

    name = "probe"
    head: ClassVar[Head | None] = None

    @property
    def query_window(self) -> int:
        return self.cfg.score_window

    def token_scores(self, view: LayerView) -> torch.Tensor:
        if self.head is None or view.layer_idx is None:
            raise ValueError(
                f"{self.name}: needs a fitted head (probe_policy) and generate_with_eviction's views"
            )
        scores = self.head(view.layer_idx, key_features(view, self.cfg.score_window))
        return scores.masked_fill(~view.live, 0.0)


def probe_policy(name: str, head: Head) -> type[ProbePolicy]:
    """A `ProbePolicy` subclass registered (by `evaluate`) under ``name``, decoding with ``head``."""
    return type(f"Probe_{name}", (ProbePolicy,), {"name": name, "head": head})


def evaluate(
    model_path: str, policies: str, probes: list[type[ProbePolicy]], eval_args: list[str]
) -> list[dict]:
    """``ngc-eval`` of ``policies`` and the ``probes`` in one run (so peak compression is against its ``full``
    run), each probe registered under its name only while it runs."""
    from oracle_cloning import evaluate as eval_policies

    from ngc_trl.policies import POLICIES

    names = [x for x in policies.split(",") if x] + [cls.name for cls in probes]
    for cls in probes:
        POLICIES[cls.name] = cls
    try:
        return eval_policies(model_path, eval_args, ",".join(names))
    finally:
        for cls in probes:
            POLICIES.pop(cls.name, None)


def main(argv: list[str] | None = None) -> dict:
    from oracle_cloning import (
        add_testbed_args,
        check_testbed_args,
        load_training_problems,
        machine,
        schedule_eval_args,
        validation_eval_args,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train_problems", type=int, default=256)
    p.add_argument("--hidden", default="0,64", help="comma list of head widths (0: linear)")
    p.add_argument("--fit_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--batch_size", type=int, default=64)
    add_testbed_args(p)
    p.add_argument("--baselines", default="full,ngc,oracle", help="policies evaluated once beside the probes")
    p.add_argument(
        "--test_num_problems",
        type=int,
        default=0,
        help="also evaluate each probe (and --test_policies) once on this many test problems of the testbed "
        "table (--data_source generated:testbed); 0: validation only",
    )
    p.add_argument(
        "--test_policies", default="full,ngc", help="policies evaluated on the test split beside the probes"
    )
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.test_num_problems < 0:
        p.error("--test_num_problems must be >= 0")
    for name in ("train_problems", "fit_steps", "batch_size"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0")
    check_testbed_args(p, a)
    try:
        widths = [int(x) for x in a.hidden.split(",")]
    except ValueError:
        p.error("--hidden must be a comma list of integers")
    if any(x < 0 for x in widths):
        p.error("--hidden widths must be >= 0")

    from transformers import AutoModelForCausalLM

    from ngc_trl import EvictionConfig
    from ngc_trl.evaluation.setup import read_problems_file
    from ngc_trl.models import load_tokenizer

    tok = load_tokenizer(a.model)  # the testbed's word-level tokenizer (AutoTokenizer would re-class it)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = EvictionConfig(
        eviction_interval=a.eviction_interval,
        eviction_rate=a.rate,
        block_size=a.block_size,
        score_window=a.score_window,
        policy="ngc",
    )
    start = time.perf_counter()
    train = collect(
        model,
        tok,
        load_training_problems(a.train_problems, 1000 + a.seed, a.validation_file),
        cfg,
        a.score_window,
        a.max_new_tokens,
        a.batch_size,
    )
    val_problems = read_problems_file(a.validation_file, "countdown", a.eval_num_problems)
    held_out = collect(model, tok, val_problems, cfg, a.score_window, a.max_new_tokens, a.batch_size)
    n_layers = model.config.num_hidden_layers
    uniform = sum(x.k / x.oracle.shape[0] for x in held_out) / max(len(held_out), 1)
    eval_args = validation_eval_args(a, a.batch_size)
    # the testbed table's split and protocol (`recipes/testbed/countdown.yaml`), at this schedule
    test_args = ["--data_source", "generated:testbed", "--num_problems", str(a.test_num_problems)]
    test_args += schedule_eval_args(a, a.batch_size)
    record = {
        "benchmark": "oracle_probe",
        "command": " ".join(["python", "bench/oracle_probe.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "settings": vars(a),
        "decisions": {"train": len(train), "held_out": len(held_out)},
        "agreement_held_out": {"uniform": uniform, "ngc": agreement(held_out, None)},
        "collect_seconds": time.perf_counter() - start,
        "probes": [],
    }
    probes = []
    for width in widths:
        head = fit(train, n_layers, width, a.fit_steps, a.lr, a.seed)
        probes.append(probe_policy(f"probe_h{width}", head))
        record["probes"].append(
            {
                "policy": probes[-1].name,
                "hidden": width,
                "agreement_train": agreement(train, head),
                "agreement_held_out": agreement(held_out, head),
            }
        )
        if not width:  # standardized weights: which features the linear probe reads, per layer
            names = feature_names(
                model.config.num_attention_heads, a.score_window, model.config.num_key_value_heads
            )
            record["probes"][-1]["weights"] = [dict(zip(names, w.tolist())) for w in head.w.detach()]
        print(json.dumps({k: v for k, v in record["probes"][-1].items() if k != "weights"}), flush=True)
    splits = [("validation", a.baselines, eval_args)]
    if a.test_num_problems:
        splits.append(("test", a.test_policies, test_args))
    for split, policies, args in splits:
        record[split] = evaluate(a.model, policies, probes, args)
        print(json.dumps({split: record[split]}), flush=True)
        if a.out:
            with open(a.out, "w") as fh:
                fh.write(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
