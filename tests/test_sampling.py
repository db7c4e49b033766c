"""Plackett–Luce log-probs against brute-force enumeration; Gumbel-top-k frequencies against PL."""

import itertools
import math

import pytest
import torch

from ngc_trl.engine.sampling import plackett_luce_log_prob, rank_blocks


def brute_force_pl(logits, order, pool):
    """Product over steps of softmax over the not-yet-chosen pool items (plain Python)."""
    remaining = [i for i in range(len(logits)) if pool[i]]
    lp = 0.0
    for j in order:
        z = sum(math.exp(logits[t]) for t in remaining)
        lp += logits[j] - math.log(z)
        remaining.remove(j)
    return lp


@pytest.mark.parametrize("n,k", [(3, 1), (4, 2), (5, 3), (5, 5)])
def test_pl_log_prob_matches_enumeration(n, k):
    g = torch.Generator().manual_seed(n * 10 + k)
    logits = torch.randn(n, generator=g) * 2
    pool = torch.ones(n, dtype=torch.bool)
    total = 0.0
    for perm in itertools.permutations(range(n), k):
        got = plackett_luce_log_prob(logits, torch.tensor(perm), pool).item()
        want = brute_force_pl(logits.tolist(), perm, pool.tolist())
        assert got == pytest.approx(want, abs=1e-5)
        total += math.exp(got)
    assert total == pytest.approx(1.0, abs=1e-5)  # the ordered k-prefixes form a distribution


def test_pl_log_prob_with_padding_pool_and_batch():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    pool = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    order = torch.tensor([[2, 0, -1], [1, -1, -1]])
    got = plackett_luce_log_prob(logits, order, pool)
    assert got[0].item() == pytest.approx(
        brute_force_pl(logits[0].tolist(), [2, 0], pool[0].tolist()), abs=1e-6
    )
    assert got[1].item() == pytest.approx(math.log(1 / 3), abs=1e-6)
    # empty action
    assert plackett_luce_log_prob(logits, torch.full((2, 3), -1), pool).abs().max().item() == 0


def test_pl_log_prob_is_stable_for_large_logits_and_differentiable():
    logits = torch.tensor([1000.0, 999.0, -1000.0, 0.0], requires_grad=True)
    lp = plackett_luce_log_prob(logits, torch.tensor([0, 1]), torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(lp)
    want = brute_force_pl([0.0, -1.0, -2000.0, -1000.0], [0, 1], [True] * 4)  # shift-invariant
    assert lp.item() == pytest.approx(want, abs=1e-4)
    lp.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gumbel_top_k_frequencies_match_plackett_luce():
    """Draw 40k ordered 2-of-4 samples; every ordered pair's frequency is within 5 binomial standard
    errors of its PL probability (a test that fails if the noise or the ordering were wrong)."""
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    pool = torch.ones(4, dtype=torch.bool)
    n = 40_000
    g = torch.Generator().manual_seed(0)
    order = rank_blocks(logits.expand(n, 4), pool.expand(n, 4), sample=True, generator=g)[:, :2]
    counts = {}
    for a, b in order.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    for perm in itertools.permutations(range(4), 2):
        p = math.exp(brute_force_pl(logits.tolist(), perm, [True] * 4))
        se = math.sqrt(p * (1 - p) / n)
        assert abs(counts.get(perm, 0) / n - p) < 5 * se, (perm, counts.get(perm, 0) / n, p)


def test_deterministic_top_k_and_pool():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.9]])
    pool = torch.tensor([[True, True, True, False]])
    order = rank_blocks(logits, pool, sample=False)
    assert order[0, :3].tolist() == [1, 2, 0]  # block 3 is outside the pool, so last


def test_rank_blocks_samples_only_the_rows_asked():
    """A per-row ``sample`` mask: unmasked rows are the deterministic top-k order, masked rows draw."""
    from ngc_trl.engine.sampling import rank_blocks

    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 2)
    pool = torch.ones(2, 4, dtype=torch.bool)
    orders = [
        rank_blocks(logits, pool, torch.tensor([False, True]), torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    assert all(o[0].tolist() == [0, 2, 1, 3] for o in orders)
    assert len({tuple(o[1].tolist()) for o in orders}) > 1
