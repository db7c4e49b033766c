"""Benchmark: the reward landscape of the eviction policy along a few block features, far from where the
policy gradient is measured.

`bench/gradient_noise.py --logit_features` measures the *local* gradient of the reward w.r.t. biases
``β_f`` added to the block logits (at β = 0). This one moves along those directions by finite steps: for
each setting ``prompt=2,newest=4`` it adds ``Σ_f β_f · f`` (the features of `gradient_noise.block_features`:
prompt share, newest block, oldest block, age) to every block logit in the evicting decode loop and runs
`ngc-eval` (greedy, top-k) on the given problems. A setting ``0`` is the policy as it is. Nothing is
trained and no option of the package changes: it answers whether some direction in this small space leads
to a better policy at all, and how far from β = 0 the gain starts. Example::

    python bench/logit_landscape.py --model outputs/tiny-base --settings "0;prompt=2;newest=2;prompt=2,newest=2" \\
        --out bench/results/logit_landscape_tiny.json -- --problems_file data/testbed/countdown/validation.jsonl \\
        --rates 0.5 --max_new_tokens 576 --batch_size 64 --prompt_format plain --eviction_interval 64 --block_size 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gradient_noise import FEATURES, install_feature_bias  # noqa: E402


def parse_setting(text: str) -> dict[str, float]:
    """``"prompt=2,newest=-1"`` -> ``{"prompt": 2.0, "newest": -1.0}``; ``"0"`` -> ``{}`` (no bias).
    Unknown features and non-finite values fail naming the setting."""
    text = text.strip()
    if text in ("0", ""):
        return {}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in FEATURES:
            raise ValueError(f"setting {text!r}: each part is feature=value with a feature in {FEATURES}")
        v = float(value)
        if not abs(v) < float("inf"):
            raise ValueError(f"setting {text!r}: {name} must be finite")
        out[name] = v
    return out


def install_bias(weights: dict[str, float], relative: bool = False):
    """Add ``features · β`` to the block logits of every rollout round (the decode loop's `score_blocks`);
    returns an undo. ``relative``: β is in units of the row's mean candidate block logit (``β = 1`` is one
    average block's score; for the tiny recipes' ``relative`` × 2 logits a training-time bias b is β = b / 2)."""
    import ngc_trl.engine.schedule as schedule

    beta = torch.tensor([weights.get(f, 0.0) for f in FEATURES])
    return install_feature_bias(schedule, beta, relative)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--settings", required=True, help='";"-separated settings, e.g. "0;prompt=2,newest=2"')
    p.add_argument("--policy", default="ngc", help="the score rule the biases are added to")
    p.add_argument(
        "--relative",
        action="store_true",
        help="biases in units of the row's mean candidate block logit (default: raw logit units)",
    )
    p.add_argument("--out", default=None)
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    a = p.parse_args(ours)
    settings = a.settings.split(";")
    parsed = [parse_setting(s) for s in settings]  # all validated before the first evaluation
    from ngc_trl.evaluation.run import main as eval_main

    runs = []
    for text, weights in zip(settings, parsed):
        restore = install_bias(weights, a.relative)
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                summary = eval_main(["--model", a.model, "--policies", a.policy, "--output_dir", tmp, *rest])
        finally:
            restore()
        r = summary["results"][0]
        runs.append(
            {
                "setting": text,
                "bias": weights,
                "seconds": time.perf_counter() - start,
                **{
                    k: r.get(k)
                    for k in (
                        "pass@1",
                        "pass@1_se",
                        "peak_compression",
                        "mean_prompt_kept",
                        "mean_rounds",
                        "truncated",
                    )
                },
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    out = {
        "benchmark": "logit_landscape",
        "command": " ".join(["python", "bench/logit_landscape.py", *argv]),
        "model": a.model,
        "features": list(FEATURES),
        "bias_units": "mean candidate block logit" if a.relative else "logit",
        "runs": runs,
    }
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
