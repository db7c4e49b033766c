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
import json
import platform
import sys
import tempfile
import time

import torch

from ngc_trl import NGCTrainer


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """``∂loss/∂params`` flattened to one fp32 vector on the CPU (zeros where a parameter gets none)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
            for g, p in zip(grads, params)
        ]
    )


def noise_stats(grads: list[torch.Tensor], batch: float) -> dict:
    """The estimates of the module docstring from K ≥ 3 batch gradients of ``batch`` rollouts each, with a
    leave-one-batch-out jackknife standard error of ``|G|^2`` and, from it, a lower bound on the noise
    scale (``tr(Sigma) / (|G|^2 + 2 se)``: with K small, ``|G|^2`` may be indistinguishable from 0)."""
    k = len(grads)
    gram = torch.stack([g.double() for g in grads]) @ torch.stack([g.double() for g in grads]).T
    sq = gram.diagonal()
    off = ~torch.eye(k, dtype=torch.bool)

    def estimate(keep: torch.Tensor) -> tuple[float, float]:
        m = keep[:, None] & keep[None, :] & off
        g2 = float(gram[m].mean())
        return g2, batch * (float(sq[keep].mean()) - g2)

    everyone = torch.ones(k, dtype=torch.bool)
    g2, trace = estimate(everyone)
    loo = [estimate(everyone & (torch.arange(k) != i))[0] for i in range(k)]
    mean_loo = sum(loo) / k
    se = ((k - 1) / k * sum((x - mean_loo) ** 2 for x in loo)) ** 0.5
    norms = sq.sqrt()
    cos = (gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300))[torch.triu(off)].tolist()
    return {
        "batches": k,
        "mean_batch_grad_norm": float(norms.mean()),
        "true_grad_sq_norm": g2,
        "true_grad_sq_norm_se": se,
        "trace_sigma": trace,
        "noise_scale_rollouts": trace / g2 if g2 > 0 else None,
        "noise_scale_rollouts_lower_bound": trace / (g2 + 2 * se) if g2 + 2 * se > 0 else None,
        "signal_share_of_batch_grad_sq": g2 / float(sq.mean()) if float(sq.mean()) > 0 else None,
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
    if a.batches < 3:
        p.error("--batches must be >= 3 (the jackknife leaves one out)")

    import ngc_trl.train as train_cli

    records: dict[str, list[torch.Tensor]] = {"token": [], "mem": []}
    rollouts: list[int] = []
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
        rollouts.append(int(inputs["advantages"].shape[0]))
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
