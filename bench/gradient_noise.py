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

With ``--logit_features`` it also asks whether the *reward* points anywhere in a few interpretable directions
of the eviction action space, whatever the model can represent: a bias ``β_f`` (shared by every layer, 0, so
rollouts are unchanged) is added in the replay to each block's Plackett–Luce logit times a block feature
``f`` — ``prompt`` (share of the block's keys in the prompt), ``newest`` (the newest block), ``first`` (the
oldest block), ``age`` (block index / (N − 1)) and ``recent32`` (share of the block's keys among the 32 newest,
what ``num_recent=32`` protects). ``∂L_mem/∂β`` per batch gives the same noise statistics in
this 5-d space and a t-statistic per feature (``−∂L_mem/∂β_f > 0``: keeping such blocks more raises the reward).

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


FEATURES = ("prompt", "newest", "first", "age", "recent32")


def block_features(view, n_blocks: int) -> torch.Tensor:
    """``(R, N, 5)`` features of every block of a `LayerView` (see `FEATURES` and the module docstring).
    The per-key prompt and recent-32 masks are the config protections' (`protection_mask`), their block
    shares the engine's block mean (`reduce_blocks`)."""
    from ngc_trl.engine.config import EvictionConfig
    from ngc_trl.engine.scoring import protection_mask, reduce_blocks

    def share(cfg):
        keys = protection_mask(view.pos, view.live, view.prompt_len, cfg).float()
        return reduce_blocks(keys, view.bid, n_blocks, "mean")

    prompt, _, exists = share(EvictionConfig(protect_prompt=True))
    recent, _, _ = share(EvictionConfig(num_recent=32))
    n = exists.sum(-1, keepdim=True)  # blocks that exist (contiguous from 0)
    idx = torch.arange(n_blocks, device=prompt.device)[None].expand_as(prompt)
    newest, first = (idx == n - 1).float(), (idx == 0).float()
    age = idx.float() / (n - 1).clamp(min=1)
    return torch.stack([prompt, newest, first, age, recent], -1)


def install_feature_bias(module, bias: torch.Tensor, relative: bool = False):
    """Make the block logits that ``module`` (`ngc_trl.engine.replay` or `ngc_trl.engine.schedule`) computes
    ``logits + features · bias``; returns an undo. ``relative``: the bias is in units of the row's mean
    candidate block logit."""
    original = module.score_blocks

    def biased(policy, view, cfg):
        blocks = original(policy, view, cfg)
        feats = block_features(view, blocks.logits.shape[-1]).to(blocks.logits.device)
        add = feats @ bias.to(blocks.logits.device)
        if relative:
            m = blocks.pool.to(blocks.logits.dtype)
            add = add * (blocks.logits * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        blocks.logits = blocks.logits + add
        return blocks

    module.score_blocks = biased

    def restore():
        module.score_blocks = original

    return restore


def feature_stats(grads: list[torch.Tensor], batch: float) -> dict:
    """`noise_stats` in the feature space, plus the mean gradient per feature, its standard error across
    batches and ``t = mean / se`` (``|t| ≥ 2``: the reward points that way, beyond the batch noise)."""
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0, unbiased=True) / len(grads) ** 0.5
    out = noise_stats(grads, batch)
    out["per_feature"] = {
        f: {"mean_grad": float(m), "se": float(s), "t": float(m / s) if s > 0 else None}
        for f, m, s in zip(FEATURES, mean, se)
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, help="an NGC training recipe (its eviction_policy: ngc)")
    p.add_argument("--batches", type=int, default=8, help="independent batches K (>= 2)")
    p.add_argument("--model", default=None, help="model_name_or_path override (default: the recipe's)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument(
        "--logit_features",
        action="store_true",
        help="also measure L_mem's gradient w.r.t. per-feature logit biases (prompt, newest, first, age, recent32)",
    )
    argv = sys.argv[1:] if argv is None else argv
    ours, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    a = p.parse_args(ours)
    if a.batches < 3:
        p.error("--batches must be >= 3 (the jackknife leaves one out)")

    import ngc_trl.train as train_cli

    records: dict[str, list[torch.Tensor]] = {"token": [], "mem": [], "features": []}
    rollouts: list[int] = []
    original = NGCTrainer._compute_loss
    bias = torch.zeros(len(FEATURES), requires_grad=True)
    if a.logit_features:
        import ngc_trl.engine.replay as replay

        restore = install_feature_bias(replay, bias)  # the replay only: rollouts are unchanged at bias 0
    else:
        restore = lambda: None  # noqa: E731

    def measured(self, model, inputs):
        params = [q for q in model.parameters() if q.requires_grad]
        coefs = (self.args.token_loss_coef, self.args.eviction_loss_coef)
        try:
            self.args.token_loss_coef, self.args.eviction_loss_coef = 1.0, 0.0
            records["token"].append(flat_grad(original(self, model, inputs), params))
            self.args.token_loss_coef, self.args.eviction_loss_coef = 0.0, 1.0
            loss = original(self, model, inputs)
            if a.logit_features:  # one backward for both (the graph is not retained)
                both = flat_grad(loss, params + [bias])
                records["features"].append(both[-len(FEATURES) :].double())
                records["mem"].append(both[: -len(FEATURES)])
            else:
                records["mem"].append(flat_grad(loss, params))
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
        restore()
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
    if a.logit_features:
        out["eviction_loss_logit_features"] = feature_stats(records["features"], batch)
    text = json.dumps(out, indent=1)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
