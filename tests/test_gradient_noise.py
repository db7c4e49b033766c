"""The gradient-noise estimator of bench/gradient_noise.py on synthetic batch gradients with a known answer."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "gradient_noise", Path(__file__).resolve().parents[1] / "bench" / "gradient_noise.py"
)
gn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gn)


def test_noise_scale_recovers_a_known_signal_and_variance():
    torch.manual_seed(0)
    d, batch, k, sigma = 2000, 16.0, 60, 0.5
    g = torch.randn(d)
    g = g / g.norm()  # |G|^2 = 1
    grads = [g + sigma / batch**0.5 * torch.randn(d) for _ in range(k)]  # per-rollout covariance sigma^2 I
    s = gn.noise_stats(grads, batch)
    assert s["true_grad_sq_norm"] == pytest.approx(1.0, abs=0.05)
    assert s["trace_sigma"] == pytest.approx(sigma**2 * d, rel=0.05)  # 500
    assert s["noise_scale_rollouts"] == pytest.approx(500, rel=0.1)
    assert len(s["cosines"]) == k * (k - 1) // 2
    assert 0 < s["true_grad_sq_norm_se"] < 0.05  # the jackknife sees the estimate is tight
    assert s["noise_scale_rollouts_lower_bound"] < s["noise_scale_rollouts"]


def test_pure_noise_has_no_direction():
    torch.manual_seed(1)
    grads = [torch.randn(5000) for _ in range(10)]
    s = gn.noise_stats(grads, 8.0)
    assert abs(s["mean_cosine"]) < 0.02 and abs(s["true_grad_sq_norm"]) < 0.05 * 5000
    # no signal: |G|^2 is within two standard errors of 0, so only a lower bound on the noise scale stands
    assert abs(s["true_grad_sq_norm"]) < 2 * s["true_grad_sq_norm_se"]


def test_all_zero_gradients_give_no_estimate_instead_of_failing():
    """Every group without reward variance (all gradients 0): nothing to estimate, reported as None."""
    s = gn.noise_stats([torch.zeros(10) for _ in range(4)], 8.0)
    assert s["noise_scale_rollouts"] is None and s["signal_share_of_batch_grad_sq"] is None
    assert s["true_grad_sq_norm"] == 0.0 and s["mean_cosine"] == 0.0


def test_set_log_prob_is_a_distribution_over_kept_sets():
    """bench/pl_set_variance.py's unordered-set probability sums to 1 over all K-subsets of N blocks."""
    import itertools

    spec2 = importlib.util.spec_from_file_location(
        "pl_set_variance", Path(__file__).resolve().parents[1] / "bench" / "pl_set_variance.py"
    )
    pv = importlib.util.module_from_spec(spec2)
    spec2.loader.exec_module(pv)
    logits = torch.tensor([1.5, -0.3, 0.2, 2.0, 0.0])
    pool = torch.ones(5, dtype=torch.bool)
    total = sum(
        pv.set_log_prob(logits, torch.tensor(s), pool).exp() for s in itertools.combinations(range(5), 3)
    )
    assert float(total) == pytest.approx(1.0, abs=1e-5)


def test_block_features_of_a_hand_built_view():
    """Two rows, block size 2: the prompt share, newest, first and age features of every block."""
    from ngc_trl.engine.policy import LayerView
    from ngc_trl.engine.scoring import block_ids

    live = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]])
    view = LayerView(None, None, pos, live, block_ids(live, 2), None, None, None, 1.0, torch.tensor([3, 1]))
    f = gn.block_features(view, 3)
    assert f.shape == (2, 3, 5)
    assert f[0, :, 0].tolist() == [1.0, 0.5, 0.0] and f[1, :, 0].tolist() == [0.5, 0.0, 0.0]  # prompt share
    assert f[0, :, 1].tolist() == [0.0, 0.0, 1.0] and f[0, :, 2].tolist() == [1.0, 0.0, 0.0]  # newest, first
    assert f[0, :, 3].tolist() == [0.0, 0.5, 1.0]
    assert f[0, :, 4].tolist() == [1.0, 1.0, 1.0]  # 5 live keys, all among the 32 newest
    live = torch.ones(1, 44, dtype=torch.bool)
    live[0, 0:4] = False  # 40 live keys in 5 blocks of 8: the oldest block is outside the 32 newest
    view = LayerView(
        None, None, torch.arange(44)[None], live, block_ids(live, 8), None, None, None, 1.0, torch.tensor([0])
    )
    assert gn.block_features(view, 5)[0, :, 4].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_feature_bias_gradient_points_to_the_rewarded_feature():
    """A PL draw whose kept set is rewarded when it holds the prompt block: the REINFORCE gradient of
    −A·log π w.r.t. the prompt bias is negative (raise it), beyond its standard error."""
    from ngc_trl.engine.sampling import plackett_luce_log_prob, rank_blocks

    torch.manual_seed(0)
    feats = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0.5, 0], [0, 1, 0, 1, 1]])  # block 0 is the prompt
    grads = []
    for _ in range(8):
        bias = torch.zeros(5, requires_grad=True)
        logits = torch.zeros(64, 3) + feats @ bias
        order = rank_blocks(logits.detach(), torch.ones(64, 3, dtype=torch.bool), sample=True)[:, :1]
        reward = (order[:, 0] == 0).float()
        adv = reward - reward.mean()
        loss = -(adv * plackett_luce_log_prob(logits, order, torch.ones(64, 3, dtype=torch.bool))).mean()
        grads.append(torch.autograd.grad(loss, bias)[0].double())
    s = gn.feature_stats(grads, 64)
    assert s["per_feature"]["prompt"]["t"] < -2
