"""Benchmark: how much of one step's gradient is signal, for L_mem and for the token loss.

It runs a training recipe through `ngc_trl.train` (the CLI's own code path) with the learning rate at 0, so
every step draws an independent batch of rollouts at the *same* parameters, and records each batch's
gradient of the two losses separately: ``g_token`` (TRL's token loss) and ``g_mem`` (L_mem, weight 1).
From K such batches of B rollouts it estimates, per loss (McCandlish et al. 2018, "An empirical model of
large-batch training", §A.1):

* ``|G|^2`` — the squared norm of the true gradient, by the mean dot product of *different* batches'
  gradients (unbiased: independent batches);
* ``tr(Sigma)`` — the per-rollout gradient variance, ``B · (mean |g_B|^2 − |G|^2)``;
* ``noise_scale = tr(Sigma) / |G|^2`` — the batch size (in rollouts) at which one step's gradient is as
  much signal as noise (the "critical batch size"); well above the batch used, Adam's normalised steps
  are mostly noise;
* ``mean_cosine`` — the mean cosine between two batches' gradients (≈ 0: the batches do not agree on a
  direction).

Zero-variance groups give zero gradients and are part of the batch, as in training. Example::

    python bench/gradient_noise.py --recipe recipes/tiny/countdown_ngc.yaml --batches 8 \\
        --out bench/results/gradient_noise_tiny.json -- --curriculum_rates 0.5 --eviction_loss_coef 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time

import torch

from ngc_trl import NGCTrainer


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """``∂loss/∂params`` flattened to one fp32 vector on the CPU (zeros where a parameter gets none)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
            for g, p in zip(grads, params)
        ]
    )


def noise_stats(grads: list[torch.Tensor], batch: float) -> dict:
    """The estimates of the module docstring from K ≥ 2 batch gradients of ``batch`` rollouts each."""
    k = len(grads)
    sq = [float(g.double().dot(g.double())) for g in grads]
    pairs = list(itertools.combinations(range(k), 2))
    dots = [float(grads[i].double().dot(grads[j].double())) for i, j in pairs]
    cos = [d / max(1e-300, (sq[i] * sq[j]) ** 0.5) for d, (i, j) in zip(dots, pairs)]
    g2 = sum(dots) / len(dots)
    mean_sq = sum(sq) / k
    trace = batch * (mean_sq - g2)
    return {
        "batches": k,
        "mean_batch_grad_norm": sum(s**0.5 for s in sq) / k,
        "true_grad_sq_norm": g2,
        "trace_sigma": trace,
        "noise_scale_rollouts": trace / g2 if g2 > 0 else None,
        "mean_cosine": sum(cos) / len(cos),
        "cosines": cos,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, help="an NGC training recipe (its eviction_policy: ngc)")
    p.add_argument("--batches", type=int, default=8, help="independent batches K (>= 2)")
    p.add_argument("--model", default=None, help="model_name_or_path override (default: the recipe's)")
    p.add_argument("--out", default=None, help="write the JSON here")
    argv = sys.argv[1:] if argv is None else argv
    ours, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    a = p.parse_args(ours)
    if a.batches < 2:
        p.error("--batches must be >= 2")

    import ngc_trl.train as train_cli

    records: dict[str, list[torch.Tensor]] = {"token": [], "mem": []}
    rollouts: list[int] = []
    zero_std: list[float] = []
    original = NGCTrainer._compute_loss

    def measured(self, model, inputs):
        params = [q for q in model.parameters() if q.requires_grad]
        coefs = (self.args.token_loss_coef, self.args.eviction_loss_coef)
        try:
            self.args.token_loss_coef, self.args.eviction_loss_coef = 1.0, 0.0
            records["token"].append(flat_grad(original(self, model, inputs), params))
            self.args.token_loss_coef, self.args.eviction_loss_coef = 0.0, 1.0
            records["mem"].append(flat_grad(original(self, model, inputs), params))
        finally:
            self.args.token_loss_coef, self.args.eviction_loss_coef = coefs
        adv = inputs["advantages"]
        rollouts.append(int(adv.shape[0]))
        groups = adv.reshape(-1, self.num_generations)
        zero_std.append(float((groups.abs().sum(1) == 0).float().mean()))
        return sum(q.sum() * 0.0 for q in params)  # no update: the next batch sees the same parameters

    NGCTrainer._compute_loss = measured
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_cli.main(
                [
                    "--config",
                    a.recipe,
                    *(["--model_name_or_path", a.model] if a.model else []),
                    "--max_steps",
                    str(a.batches),
                    "--learning_rate",
                    "0",
                    "--output_dir",
                    tmp,
                    "--save_strategy",
                    "no",
                    "--eval_after_train",
                    "false",
                    "--curve_every",
                    "0",
                    "--report_to",
                    "none",
                    "--gradient_accumulation_steps",
                    "1",
                    *overrides,
                ]
            )
    finally:
        NGCTrainer._compute_loss = original
    batch = sum(rollouts) / len(rollouts)
    out = {
        "benchmark": "gradient_noise",
        "command": " ".join(["python", "bench/gradient_noise.py", *argv]),
        "recipe": a.recipe,
        "model": a.model,
        "overrides": overrides,
        "machine": {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
        },
        "rollouts_per_batch": batch,
        "zero_variance_group_share": sum(zero_std) / len(zero_std),
        "seconds": time.perf_counter() - start,
        "token_loss": noise_stats(records["token"], batch),
        "eviction_loss": noise_stats(records["mem"], batch),
    }
    text = json.dumps(out, indent=1)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
