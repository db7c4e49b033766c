"""Benchmark: how much of an eviction decision's score-function variance is the *order* of the draw.

The eviction action of a round is the ordered Gumbel-top-k draw ``σ`` and L_mem uses its Plackett–Luce
log-probability (paper Eq. 3). What is kept is only the unordered set ``S = {σ_1..σ_K}``, whose
probability sums the ordered one over all ``K!`` orders; its score function ``∇ log P(S)`` is the
conditional expectation of ``∇ log P(σ)`` given ``S`` (Rao–Blackwell), so it has lower variance. This
script measures by how much, by brute force over the orders, for ``N`` blocks with logits shaped like the
tiny recipes' (``2 · x / mean(x)``, ``x`` exponential: a few blocks take most of the attention), keeping
``K = N/2`` (ε = 0.5)::

    python bench/pl_set_variance.py --out bench/results/pl_set_variance.json

A ratio near the ~25–100× the gradient-noise measurement asks for would make the set log-probability
worth a switch; ~1.5× would not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch

from ngc_trl.engine.sampling import plackett_luce_log_prob, rank_blocks


def set_log_prob(logits: torch.Tensor, kept: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """``log P(S)`` of the unordered set ``kept (K,)`` under Gumbel-top-k on ``logits (N,)``: the
    logsumexp of the Plackett–Luce log-probabilities of its ``K!`` orders (brute force; small K only)."""
    perms = torch.tensor(list(itertools.permutations(kept.tolist())))
    lp = plackett_luce_log_prob(logits.expand(len(perms), -1), perms, pool.expand(len(perms), -1))
    return torch.logsumexp(lp, 0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="8,10,12", help="block counts N (K = N / 2)")
    p.add_argument("--trials", type=int, default=3, help="logit vectors per N")
    p.add_argument("--samples", type=int, default=200, help="draws per logit vector")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        k = n // 2
        pool = torch.ones(n, dtype=torch.bool)
        for trial in range(a.trials):
            x = torch.distributions.Exponential(1.0).sample((n,))
            base = 2 * x / x.mean()
            ordered, unordered = [], []
            for _ in range(a.samples):
                logits = base.clone().requires_grad_(True)
                order = rank_blocks(logits.detach(), pool, True)[:k]
                (g1,) = torch.autograd.grad(plackett_luce_log_prob(logits, order, pool), logits)
                (g2,) = torch.autograd.grad(set_log_prob(logits, order, pool), logits)
                ordered.append(g1)
                unordered.append(g2)
            vo = torch.stack(ordered).var(0).sum().item()
            vs = torch.stack(unordered).var(0).sum().item()
            rows.append({"N": n, "K": k, "trial": trial, "var_ordered": vo, "var_set": vs, "ratio": vo / vs})
            print(rows[-1])
    ratios = [r["ratio"] for r in rows]
    out = {
        "benchmark": "pl_set_variance",
        "command": " ".join(
            ["python", "bench/pl_set_variance.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
