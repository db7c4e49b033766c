"""The staircase eviction-rate curriculum (NGC paper Eq. 6).

Over the *retention* rate ``p0 = 1 − ε`` with levels ``ρ_0 ≥ ρ_1 ≥ … ≥ ρ_K``, ``Δ`` steps per stage,
stage ``ℓ = min(⌊t/Δ⌋, K)`` and progress ``s = (t mod Δ)/Δ``:

    p0 = ρ_ℓ                                        if s < 1 − α
    p0 = ρ_ℓ + ((s − (1 − α)) / α) · (ρ_{ℓ+1} − ρ_ℓ)  otherwise;      p0 = ρ_K at ℓ = K.

Each stage holds its level for the first ``1 − α`` of its steps, then ramps linearly to the next level.
The paper gives α = 0.6 but neither the levels nor Δ; our default levels are ε = 0.1 … 0.5 with Δ = 20
(Fig. 5 shows eviction reaching 50% over ~100 steps). The rate is a pure function of the global step, so a
resumed run continues at the same rate.

`GatedCurriculum` (``NGCConfig.curriculum_gate``, beyond the paper) runs the same staircase on a stage
clock that advances only while the rollout reward stays above a fraction of a reference reward.
"""

from __future__ import annotations

import math


def curriculum_rate(step: int, rates: list[float], stage_steps: int, alpha: float = 0.6) -> float:
    """Eviction rate ``ε`` in force at optimizer step ``step``.

    Args:
        step: global optimizer step (``trainer.state.global_step``), ``≥ 0``.
        rates: eviction-rate levels ``ε_0 ≤ ε_1 ≤ … ≤ ε_K`` (i.e. ``ρ_k = 1 − ε_k``).
        stage_steps: ``Δ``, steps per stage.
        alpha: ``α`` in ``(0, 1]``, the share of each stage spent ramping to the next level.
    """
    if not rates:
        raise ValueError("curriculum_rate: rates must not be empty")
    levels = [1.0 - r for r in rates]
    k = len(levels) - 1
    stage = min(step // stage_steps, k)
    if stage == k:
        return rates[-1]
    s = (step % stage_steps) / stage_steps
    p0 = levels[stage]
    if s >= 1.0 - alpha:
        p0 = levels[stage] + ((s - (1.0 - alpha)) / alpha) * (levels[stage + 1] - levels[stage])
    return round(1.0 - p0, 12)


class GatedCurriculum:
    """The Eq. 6 staircase on a stage clock that advances only while the reward keeps up (beyond the paper).

    The paper's curriculum is time-driven: the rate at optimizer step ``t`` is ``curriculum_rate(t)``. Here
    the rate is ``curriculum_rate(c)`` for a *stage clock* ``c`` that moves with ``t`` only over the steps
    trained on rollout batches that passed the gate, and holds otherwise:

    * after each training rollout batch, generated at global step ``t`` at the rate ``curriculum_rate(c_t)``,
      `update` compares its mean reward ``r`` (gathered over processes, so every process decides alike) with
      ``gate × reference``. ``r ≥ gate × reference``: the clock runs from ``t`` until the next batch (it
      advances by one for every optimizer step taken on this batch); otherwise it stays at ``c_t``;
    * a reward that is NaN (every completion unscorable) holds the clock.

    The reference — "the reward without eviction":

    * ``reference`` set: a fixed number, the full-cache reward of the model being trained measured once
      (e.g. ``ngc-eval --policies full`` on the base or the full-cache RL model, same reward function). The
      gate applies at every level, ``ε_0`` included.
    * ``reference=None`` (default): the bias-corrected EMA (decay ``ema``) of the batch rewards at the
      lowest level ``ε_0`` (rollouts whose rate is ``rates[0]``, i.e. the hold of stage 0, the calibration
      window). Those batches always pass (gating a level against its own reward is void); from the first
      batch above ``ε_0`` on, the reference is frozen. It is the reward *without eviction* only when
      ``rates[0] == 0`` (recommended: start the staircase at 0); otherwise it is the reward at ``ε_0``.
      Since the clock never goes back, the reference is never re-measured: as the model improves it
      becomes lenient, and a reference of 0 (a model that never solves at ``ε_0``) lets every batch pass.
      Use a fixed ``reference`` then. Rewards are assumed ``≥ 0`` (the tasks' rewards are in [0, 1]).

    While every batch passes, ``rate(t)`` equals ``curriculum_rate(t)`` at every step: the paper's schedule
    is the case of a gate that never closes. ``NGCConfig.curriculum_gate=None`` uses Eq. 6 directly.

    The clock is stored lazily, anchored at the step of the last update: ``effective_step(t) = stage_step +
    (t − anchor_step if advancing else 0)``; `state_dict` / `load_state_dict` carry it (and the reference)
    across a checkpoint.
    """

    def __init__(
        self,
        rates: list[float],
        stage_steps: int,
        alpha: float = 0.6,
        gate: float = 1.0,
        reference: float | None = None,
        ema: float = 0.9,
    ):
        if not rates:
            raise ValueError("GatedCurriculum: rates must not be empty")
        if not 0.0 < gate <= 1.0:
            raise ValueError(f"GatedCurriculum: gate={gate} must be in (0, 1]")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"GatedCurriculum: ema={ema} must be in [0, 1)")
        if reference is not None and not (math.isfinite(reference) and reference > 0):
            raise ValueError(f"GatedCurriculum: reference={reference} must be a finite reward > 0")
        self.rates, self.stage_steps, self.alpha = [float(r) for r in rates], int(stage_steps), float(alpha)
        self.gate, self.reference, self.ema = float(gate), reference, float(ema)
        self.stage_step = 0  # the clock at anchor_step
        self.anchor_step = 0  # global step of the last update
        self.advancing = True  # verdict of the last update: does the clock run from anchor_step on?
        self.ema_sum = 0.0  # biased EMA accumulator of the rewards at rates[0]
        self.ema_count = 0
        self.passed = self.held = 0

    def effective_step(self, step: int) -> int:
        """The stage clock at global optimizer step ``step`` (``≥`` the last update's step)."""
        return self.stage_step + (max(0, step - self.anchor_step) if self.advancing else 0)

    def rate(self, step: int) -> float:
        """ε in force at global step ``step``: Eq. 6 at the stage clock ``effective_step(step)``."""
        return curriculum_rate(self.effective_step(step), self.rates, self.stage_steps, self.alpha)

    def reference_reward(self) -> float | None:
        """The reward the gate compares with: the fixed ``reference``, else the bias-corrected EMA of the
        rewards at ``rates[0]`` (None before any)."""
        if self.reference is not None:
            return self.reference
        if self.ema_count == 0:
            return None
        return self.ema_sum / (1.0 - self.ema**self.ema_count)

    def update(self, step: int, mean_reward: float) -> bool:
        """Record the mean reward of the rollout batch generated at global step ``step`` (at ``rate(step)``);
        returns whether it passed the gate (the clock then runs until the next update)."""
        if step < self.anchor_step:
            raise ValueError(
                f"GatedCurriculum.update: step {step} is before the last update's {self.anchor_step}"
            )
        self.stage_step, self.anchor_step = self.effective_step(step), step
        reward = float(mean_reward)
        if not math.isfinite(reward):
            passed = False
        elif self.reference is None and self.rate(step) <= self.rates[0] + 1e-12:
            self.ema_sum = self.ema * self.ema_sum + (1.0 - self.ema) * reward  # calibration at rates[0]
            self.ema_count += 1
            passed = True
        else:
            ref = self.reference_reward()
            # no reference yet (a state resumed without one): fall back to the time-driven clock
            passed = ref is None or reward >= self.gate * ref - 1e-12
        self.advancing = passed
        self.passed += passed
        self.held += not passed
        return passed

    def state_dict(self) -> dict:
        """The JSON-serialisable state (clock, anchor, verdict, reference EMA, counters)."""
        return {
            "stage_step": self.stage_step,
            "anchor_step": self.anchor_step,
            "advancing": self.advancing,
            "ema_sum": self.ema_sum,
            "ema_count": self.ema_count,
            "passed": self.passed,
            "held": self.held,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.stage_step, self.anchor_step = int(state["stage_step"]), int(state["anchor_step"])
        self.advancing = bool(state["advancing"])
        self.ema_sum, self.ema_count = float(state["ema_sum"]), int(state["ema_count"])
        self.passed, self.held = int(state.get("passed", 0)), int(state.get("held", 0))
