"""L_mem (`ngc_trl.ngc.loss.eviction_policy_loss`) against hand-computed values."""

import math

import pytest
import torch

from ngc_trl.ngc.loss import eviction_policy_loss

# two rollouts, two round slots, two layers; rollout 1's second round never fired, and in rollout 0's
# second round layer 1 evicted nothing
ACTED = torch.tensor([[[True, True], [True, False]], [[True, True], [False, False]]])
ADV = torch.tensor([0.5, -0.5])
OLD = torch.tensor([[[-1.0, -2.0], [-3.0, 0.0]], [[-1.5, -0.5], [0.0, 0.0]]])


def test_on_policy_value_and_gradient_are_the_papers():
    new = OLD.clone().requires_grad_(True)
    loss = eviction_policy_loss(new, OLD, ACTED, ADV, normalizer=4.0)
    # ratio 1: per action −Â; rollout 0: layer 0 mean over 2 rounds (−0.5), layer 1 one round (−0.5) → −1.0;
    # rollout 1: +0.5 + 0.5 = +1.0; sum 0 / 4
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    # ∂/∂logp = −Â / (rounds of that layer in that rollout) / normalizer
    expected = torch.tensor([[[-0.5 / 2, -0.5 / 1], [-0.5 / 2, 0.0]], [[0.5 / 1, 0.5 / 1], [0.0, 0.0]]]) / 4.0
    torch.testing.assert_close(new.grad, expected)


def test_off_policy_ratio_clip_and_delta():
    new = OLD.clone()
    new[0, 0, 0] += math.log(1.5)  # ratio 1.5 on a positive advantage: clipped to 1.2
    new[1, 0, 0] += math.log(
        0.5
    )  # ratio 0.5 on a negative advantage: clipped to 0.8 (min picks the larger loss)
    loss = eviction_policy_loss(new, OLD, ACTED, ADV, normalizer=1.0)
    r0 = (-1.2 * 0.5 + -1.0 * 0.5) / 2 + (-1.0 * 0.5)
    r1 = max(0.5 * 0.5, 0.8 * 0.5) + 1.0 * 0.5
    assert loss.item() == pytest.approx(r0 + r1)
    # delta caps the unclipped ratio: a ratio of 3 on a negative advantage counts as 2 (TRL's two-sided clip)
    new2 = OLD.clone()
    new2[1, 0, 1] += math.log(3.0)
    loss = eviction_policy_loss(new2, OLD, ACTED, ADV, normalizer=1.0, delta=2.0)
    r0 = -0.5 + -0.5
    r1 = 0.5 * 1.0 + 0.5 * 2.0
    assert loss.item() == pytest.approx(r0 + r1)


def test_sequence_level_ratio_is_one_per_rollout():
    new = OLD.clone()
    new[0, 0, 0] += 0.3  # rollout 0 has 3 actions: its one log-ratio is 0.1
    loss = eviction_policy_loss(new, OLD, ACTED, ADV, normalizer=1.0, sequence_level=True)
    rho = math.exp(0.1)
    r0 = (
        -(min(rho, 1.2) * 0.5) * 2
    )  # every action of rollout 0 carries the same ratio: layer means × 2 layers
    r1 = 0.5 * 2
    assert loss.item() == pytest.approx(r0 + r1, rel=1e-6)


def test_no_action_no_loss():
    new = torch.zeros(2, 1, 2, requires_grad=True)
    loss = eviction_policy_loss(new, new.detach(), torch.zeros(2, 1, 2, dtype=torch.bool), ADV, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and not new.grad.any()
