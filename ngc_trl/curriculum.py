"""The staircase eviction-rate curriculum (NGC paper Eq. 6).

Over the *retention* rate ``p0 = 1 − ε`` with levels ``ρ_0 ≥ ρ_1 ≥ … ≥ ρ_K``, ``Δ`` steps per stage,
stage ``ℓ = min(⌊t/Δ⌋, K)`` and progress ``s = (t mod Δ)/Δ``:

    p0 = ρ_ℓ                                        if s < 1 − α
    p0 = ρ_ℓ + ((s − (1 − α)) / α) · (ρ_{ℓ+1} − ρ_ℓ)  otherwise;      p0 = ρ_K at ℓ = K.

Each stage holds its level for the first ``1 − α`` of its steps, then ramps linearly to the next level.
The paper gives α = 0.6 but neither the levels nor Δ; our default levels are ε = 0.1 … 0.5 with Δ = 20
(Fig. 5 shows eviction reaching 50% over ~100 steps). The rate is a pure function of the global step, so a
resumed run continues at the same rate.
"""

from __future__ import annotations


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
