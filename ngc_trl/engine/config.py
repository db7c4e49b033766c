"""The decode-schedule configs: `EvictionConfig` (the grow-then-evict schedule shared by NGC, the heuristic
baselines and evaluation) and `BeaconConfig` (Breadcrumbs beacon decoding). `schedule_config_from_dict`
reads either back from a model's ``ngc_settings.json``.

Paper (NGC, arXiv 2604.18002, §4.1, §A.3): every ``δ`` tokens (the prompt counts) an eviction round fires;
at a round every layer keeps a fraction ``1 − ε`` of all its live entries, in blocks of ``b`` keys, scored
by the model's own attention (``w`` most recent queries). Nothing is protected by default.

Project choices (documented in the README's "deviations from the paper"):

* ``K = max(1, ceil((1 − ε) · N))`` blocks are kept out of ``N = ceil(T / b)`` live blocks.
* A prompt that crosses one or more multiples of ``δ`` gets a single round right after prefill; later
  rounds fire at the following multiples of ``δ``.
* Optional protections (``protect_prompt``, ``num_sink``, ``num_recent``) are off by default. A block
  holding any protected entry is kept without being part of the sampled action.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

BLOCK_REDUCTIONS = ("mean", "max", "sum")
LOGIT_TRANSFORMS = ("none", "log", "relative")


@dataclass
class EvictionConfig:
    """Settings of the evicting decode loop.

    Args:
        eviction_interval (`int`, defaults to 256): ``δ``, tokens (prompt included) between two rounds.
        eviction_rate (`float`, defaults to 0.5): ``ε`` in ``[0, 1)``, the fraction of live blocks evicted
            per round in every layer. ``0`` never evicts.
        block_size (`int`, defaults to 32): ``b``, keys per block; blocks are re-cut over survivors each round.
        score_window (`int`, defaults to 5): ``w``, number of most recent queries whose attention scores keys.
        policy (`str`, defaults to ``"ngc"``): name of the score rule (see `ngc_trl.policies.POLICIES`);
            ``"full"`` never evicts.
        protect_prompt (`bool`, defaults to False): never evict prompt entries (not in the paper).
        num_sink (`int`, defaults to 0): never evict the first ``num_sink`` live entries (not in the paper).
        num_recent (`int`, defaults to 0): never evict the ``num_recent`` newest entries (not in the paper).
        block_reduction (`str`, defaults to ``"mean"``): how per-key scores become a block score
            (paper: masked ``mean``).
        logit_scale (`float`, defaults to 1.0): multiplies block scores before they are used as
            Plackett–Luce logits (paper: 1, raw means). Acts as an inverse temperature.
        logit_transform (`str`, defaults to ``"none"``): ``"log"`` uses ``log(score)`` as logits instead of
            the raw score; ``"relative"`` divides each block's score by the mean score of the row's candidate
            blocks (scale-free; `ngc_trl.engine.scoring.block_logits`). Neither is in the paper.
        window_size (`int` or None): a policy's own observation window (SnapKV's native 64, H2O's recent
            window...). ``None`` uses each policy's documented default.
    """

    eviction_interval: int = 256
    eviction_rate: float = 0.5
    block_size: int = 32
    score_window: int = 5
    policy: str = "ngc"
    protect_prompt: bool = False
    num_sink: int = 0
    num_recent: int = 0
    block_reduction: str = "mean"
    logit_scale: float = 1.0
    logit_transform: str = "none"
    window_size: int | None = None

    def __post_init__(self):
        from ngc_trl.engine.policy import policy_names  # local import: the policy module imports this one

        def bad(name, why):
            raise ValueError(f"EvictionConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("eviction_interval", "block_size", "score_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(name, "must be a positive integer")
        if not isinstance(self.eviction_rate, (int, float)) or not 0.0 <= float(self.eviction_rate) < 1.0:
            bad("eviction_rate", "must be in [0, 1)")
        self.eviction_rate = float(self.eviction_rate)
        for name in ("num_sink", "num_recent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.window_size is not None and (not isinstance(self.window_size, int) or self.window_size <= 0):
            bad("window_size", "must be a positive integer or None")
        if self.policy not in policy_names():
            bad("policy", f"unknown policy; valid policies: {', '.join(policy_names())}")
        if self.block_reduction not in BLOCK_REDUCTIONS:
            bad("block_reduction", f"must be one of {BLOCK_REDUCTIONS}")
        if self.logit_transform not in LOGIT_TRANSFORMS:
            bad("logit_transform", f"must be one of {LOGIT_TRANSFORMS}")
        if (
            not isinstance(self.logit_scale, (int, float))
            or not math.isfinite(self.logit_scale)
            or self.logit_scale <= 0
        ):
            bad("logit_scale", "must be a finite positive number")
        if not isinstance(self.protect_prompt, bool):
            bad("protect_prompt", "must be a boolean")

    # ------------------------------------------------------------------ schedule helpers
    def num_kept_blocks(self, num_blocks: int, eviction_rate: float | None = None) -> int:
        """``K = max(1, ceil((1 − ε)·N))`` (project choice for the paper's "a (1 − ε) fraction")."""
        eps = self.eviction_rate if eviction_rate is None else eviction_rate
        if num_blocks <= 0:
            return 0
        # round before ceil so that e.g. (1 - 0.7) * 10 = 3.0000000000000004 keeps 3, not 4
        return max(1, math.ceil(round((1.0 - eps) * num_blocks, 9)))

    def round_positions(self, prompt_length: int, total_length: int) -> list[int]:
        """Absolute positions ``p`` at which a round fires, for one sequence of ``total_length`` tokens.

        A round at ``p`` fires once entries ``0..p-1`` are cached and before the token at ``p`` is fed
        to the model. The last generated token is never fed, so rounds need ``p < total_length - 1``.
        Multiples of ``δ`` crossed by the prompt collapse into a single round right after prefill
        (at ``p = prompt_length``).
        """
        total_length -= 1  # positions that are fed: 0 .. total_length - 2
        d = self.eviction_interval
        out = []
        if prompt_length >= d and prompt_length < total_length:
            out.append(prompt_length)
        p = (prompt_length // d + 1) * d
        while p < total_length:
            out.append(p)
            p += d
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvictionConfig:
        """Build from a dict, rejecting unknown keys (a model card or user file is untrusted input)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"EvictionConfig: unknown fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


LEGACY_EVICTION_KEYS = {"compression_ratio": 0, "beacon_token_id": None}
"""Keys older ``ngc_settings.json`` files carry at these neutral values (Breadcrumbs once shared this config)."""


@dataclass
class BeaconConfig:
    """Breadcrumbs beacon decoding (Monea et al., arXiv 2510.13797; docs/method.md §8): a beacon token is fed
    after every ``c`` generated tokens and the window of ``c`` entries it closes is dropped from every layer
    (`ngc_trl.engine.schedule.BeaconWindows`). No score rule, no δ/ε/b round.

    Args:
        beacon_token_id (`int`): the id of the beacon token (`ngc_trl.breadcrumbs.beacons.add_beacon_token`).
        compression_ratio (`int`, defaults to 8): ``c >= 2``.
    """

    beacon_token_id: int
    compression_ratio: int = 8

    def __post_init__(self):
        for name, low in (("beacon_token_id", 0), ("compression_ratio", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"BeaconConfig.{name}={v!r}: must be an integer >= {low}")

    def to_dict(self) -> dict:
        """The settings-file form: ``{"schedule": "beacons", ...}``."""
        return {"schedule": "beacons", **asdict(self)}


def schedule_config_from_dict(d: dict) -> EvictionConfig | BeaconConfig:
    """The config a settings dict describes, rejecting unknown keys (a settings file is untrusted input).

    ``{"schedule": "beacons", ...}`` is a `BeaconConfig`; so is an older Breadcrumbs file
    (``policy="breadcrumbs"`` with ``compression_ratio`` / ``beacon_token_id`` beside `EvictionConfig`'s other,
    unused fields). Anything else is an `EvictionConfig` (older files' `LEGACY_EVICTION_KEYS` at their
    neutral values are dropped)."""
    d = dict(d)
    if d.get("schedule") == "beacons" or d.get("policy") == "breadcrumbs":
        if d.pop("schedule", None) is None:  # an older file: its eviction fields were unused
            for f in fields(EvictionConfig):
                d.pop(f.name, None)
        names = {f.name for f in fields(BeaconConfig)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"BeaconConfig: unknown fields {sorted(unknown)}; valid: {sorted(names)}")
        if "beacon_token_id" not in d:
            raise ValueError("BeaconConfig.beacon_token_id: missing")
        return BeaconConfig(**d)
    if "schedule" in d:
        raise ValueError(f"schedule={d['schedule']!r}: must be 'beacons' or absent (an EvictionConfig)")
    for key, neutral in LEGACY_EVICTION_KEYS.items():
        if key in d and d[key] == neutral:
            del d[key]
    return EvictionConfig.from_dict(d)
