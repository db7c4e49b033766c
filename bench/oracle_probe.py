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
not carry (at this model size). Not in the paper; the linear probe became the ``score_head`` policy
(`ngc_trl.policies.score_head`, fitted by `ngc_trl.ngc.score_head_warm_start`, whose pieces this reuses).
The states are the oracle's own (a probe decoding on its own drifts from them, so agreement is an optimistic measure and
accuracy is the one that counts). Example::

    python bench/oracle_probe.py --model outputs/tiny-base --train_problems 256 --hidden 0,64 \\
        --out bench/results/oracle_probe_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import ClassVar

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ngc_trl.engine.policy import EvictionPolicy, LayerView  # noqa: E402
from ngc_trl.ngc.score_head_warm_start import (  # noqa: E402, F401  (the probe's pieces, re-exported)
    Decision,
    RecordingOracle,
    agreement,
    block_scores,
    collect,
    fit,
)
from ngc_trl.policies.score_head import ScoreHead as Head  # noqa: E402
from ngc_trl.policies.score_head import feature_names, key_features  # noqa: E402


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
        head = fit(train, n_layers, width, a.fit_steps, a.lr, a.seed, window=a.score_window)
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
