"""``python -m ngc_trl.warm_start``: fit a `score_head` scoring head to the hindsight oracle (not in the paper).

Copies ``--model`` (weights and tokenizer, unchanged) to ``--output_dir`` with a scoring head fitted by
`ngc_trl.ngc.score_head_warm_start` on ``--num_problems`` training prompts of a generated task (drawn from
its ``train`` split, never from the held-out ``test`` split and never an instance of ``--exclude_file``, the
validation split), and ``ngc_settings.json`` naming ``policy: score_head`` at the schedule it was fitted
at. ``ngc-eval --model <output_dir> --policies full,score_head`` evaluates it; an NGC recipe with
``eviction_policy: score_head`` trains it from the reward (recipes/tiny/countdown_ngc_score_head.yaml).

    python -m ngc_trl.warm_start --model outputs/tiny-base --output_dir outputs/tiny-base-score_head
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ngc_trl.warm_start", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a local model folder (the language model stays as it is)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--task", default="countdown", help="a generated task")
    p.add_argument("--data_source", default="generated:testbed")
    p.add_argument("--prompt_format", default="plain", choices=["plain", "chat"])
    p.add_argument(
        "--exclude_file",
        default="data/testbed/countdown/validation.jsonl",
        help="JSONL of instances never used (the validation split); '' for none",
    )
    p.add_argument("--num_problems", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eviction_interval", type=int, default=64)
    p.add_argument("--eviction_rate", type=float, default=0.5)
    p.add_argument("--block_size", type=int, default=8)
    p.add_argument("--score_window", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=576)
    p.add_argument("--hidden", type=int, default=0, help="0: linear head; > 0: one hidden SiLU layer")
    p.add_argument("--fit_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--batch_size", type=int, default=64)
    a = p.parse_args(argv)
    positive = ("num_problems", "eviction_interval", "block_size", "score_window", "max_new_tokens")
    for name in (*positive, "fit_steps", "batch_size"):
        if getattr(a, name) <= 0:
            p.error(f"--{name}={getattr(a, name)}: must be > 0")
    if not 0.0 < a.eviction_rate < 1.0:
        p.error(f"--eviction_rate={a.eviction_rate}: must be in (0, 1) (the oracle must evict)")
    if a.hidden < 0:
        p.error(f"--hidden={a.hidden}: must be >= 0")
    if not a.lr > 0:
        p.error(f"--lr={a.lr}: must be > 0")
    if not os.path.isdir(a.model):
        p.error(f"--model={a.model!r}: not a local folder")
    if a.exclude_file and not os.path.isfile(a.exclude_file):
        p.error(f"--exclude_file={a.exclude_file!r}: not found")
    if os.path.abspath(a.output_dir) == os.path.abspath(a.model):
        p.error("--output_dir: must differ from --model (the model folder is copied, not changed)")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from ngc_trl.engine.config import EvictionConfig
    from ngc_trl.evaluation.learning_curve import load_validation_problems
    from ngc_trl.hub import write_ngc_settings
    from ngc_trl.models import load_tokenizer
    from ngc_trl.ngc.score_head_warm_start import agreement, collect, fit
    from ngc_trl.policies.score_head import save_score_head

    exclude = []
    if a.exclude_file:
        with open(a.exclude_file, encoding="utf-8") as fh:
            exclude = [json.loads(line) for line in fh if line.strip()]
    problems = load_validation_problems(
        a.task, a.data_source, a.num_problems, 1000 + a.seed, exclude=exclude, prompt_format=a.prompt_format
    )
    if any(not isinstance(x["prompt"], str) for x in problems):
        raise ValueError("--prompt_format: the warm start decodes plain string prompts")
    tok = load_tokenizer(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = EvictionConfig(
        eviction_interval=a.eviction_interval,
        eviction_rate=a.eviction_rate,
        block_size=a.block_size,
        score_window=a.score_window,
        policy="ngc",
    )
    start = time.perf_counter()
    decisions = collect(model, tok, problems, cfg, a.score_window, a.max_new_tokens, a.batch_size)
    collected = time.perf_counter() - start
    head = fit(
        decisions, model.config.num_hidden_layers, a.hidden, a.fit_steps, a.lr, a.seed, window=a.score_window
    )
    record = {
        "warm_start": "score_head",
        "init_from": a.model,
        "command": " ".join(["python -m ngc_trl.warm_start", *(sys.argv[1:] if argv is None else argv)]),
        "settings": vars(a),
        "problems": len(problems),
        "decisions": len(decisions),
        "agreement_with_oracle": {
            "score_head": agreement(decisions, head),
            "ngc": agreement(decisions, None),
        },
        "collect_seconds": round(collected, 1),
        "fit_seconds": round(time.perf_counter() - start - collected, 1),
    }
    model.save_pretrained(a.output_dir)
    tok.save_pretrained(a.output_dir)
    save_score_head(head, a.output_dir)
    write_ngc_settings(a.output_dir, dataclasses.replace(cfg, policy="score_head"))
    with open(os.path.join(a.output_dir, "score_head_warm_start.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    print(json.dumps({k: record[k] for k in ("problems", "decisions", "agreement_with_oracle")}), flush=True)
    return record


if __name__ == "__main__":
    main()
