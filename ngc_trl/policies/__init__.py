"""Eviction policies by name. `get_policy(cfg)` builds the one an `EvictionConfig` names.

Add a policy: one file with one `EvictionPolicy` subclass and its `token_scores`, one line in
`POLICIES`, one row in the score-rule tests (tests/test_policies.py) and a README bullet.
"""

from __future__ import annotations

from ngc_trl.policies.base import EvictionPolicy, LayerView
from ngc_trl.policies.full import FullCachePolicy
from ngc_trl.policies.h2o import H2OPolicy
from ngc_trl.policies.keydiff import KeyDiffPolicy
from ngc_trl.policies.knorm import KNormPolicy
from ngc_trl.policies.ngc import NGCPolicy
from ngc_trl.policies.random import RandomPolicy
from ngc_trl.policies.snapkv import SnapKVPolicy
from ngc_trl.policies.streaming_llm import StreamingLLMPolicy
from ngc_trl.policies.tova import TOVAPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    NGCPolicy.name: NGCPolicy,
    FullCachePolicy.name: FullCachePolicy,
    StreamingLLMPolicy.name: StreamingLLMPolicy,
    SnapKVPolicy.name: SnapKVPolicy,
    KNormPolicy.name: KNormPolicy,
    KeyDiffPolicy.name: KeyDiffPolicy,
    H2OPolicy.name: H2OPolicy,
    TOVAPolicy.name: TOVAPolicy,
    RandomPolicy.name: RandomPolicy,
}


def get_policy(cfg) -> EvictionPolicy:
    """The policy instance for ``cfg.policy``; unknown names fail with the list of valid ones."""
    try:
        cls = POLICIES[cfg.policy]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {cfg.policy!r}; valid: {', '.join(sorted(POLICIES))}"
        ) from None
    return cls(cfg)


__all__ = [
    "POLICIES",
    "EvictionPolicy",
    "FullCachePolicy",
    "H2OPolicy",
    "KNormPolicy",
    "KeyDiffPolicy",
    "LayerView",
    "NGCPolicy",
    "RandomPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "TOVAPolicy",
    "get_policy",
]
