"""Eviction policies by name. `get_policy(cfg)` builds the one an `EvictionConfig` names.

Importing this package registers every rule below in the engine's registry (`ngc_trl.engine.policy`).

Add a policy: one file with one `EvictionPolicy` subclass and its `token_scores`, one entry in the
`register_policy` loop below, one row in the score-rule tests (tests/test_policies.py) and a README bullet.

``oracle`` (`OraclePolicy`, flag ``hindsight``) is in `POLICIES` but is an evaluation-only ceiling, not a
method: it reads the future attention of the full-cache completion, built per batch by
`ngc_trl.policies.oracle.oracle_for_batch`, and refuses to run without it (tests/test_oracle.py).

``score_head`` (`ScoreHeadPolicy`, flag ``needs_model``; not in the paper) is a learned scoring head attached
to the model, built from it by ``get_policy(cfg, model)`` (`ngc_trl.policies.score_head`).
"""

from __future__ import annotations

from ngc_trl.engine.policy import POLICIES, EvictionPolicy, LayerView, get_policy, register_policy
from ngc_trl.policies.full import FullCachePolicy
from ngc_trl.policies.h2o import H2OPolicy
from ngc_trl.policies.keydiff import KeyDiffPolicy
from ngc_trl.policies.knorm import KNormPolicy
from ngc_trl.policies.ngc import NGCPolicy
from ngc_trl.policies.oracle import OraclePolicy
from ngc_trl.policies.random import RandomPolicy
from ngc_trl.policies.score_head import ScoreHeadPolicy
from ngc_trl.policies.snapkv import SnapKVPolicy
from ngc_trl.policies.streaming_llm import StreamingLLMPolicy
from ngc_trl.policies.tova import TOVAPolicy

for _cls in (
    NGCPolicy,
    FullCachePolicy,
    StreamingLLMPolicy,
    SnapKVPolicy,
    KNormPolicy,
    KeyDiffPolicy,
    H2OPolicy,
    TOVAPolicy,
    RandomPolicy,
    OraclePolicy,
    ScoreHeadPolicy,
):
    register_policy(_cls)


__all__ = [
    "POLICIES",
    "EvictionPolicy",
    "FullCachePolicy",
    "H2OPolicy",
    "KNormPolicy",
    "KeyDiffPolicy",
    "LayerView",
    "NGCPolicy",
    "OraclePolicy",
    "RandomPolicy",
    "ScoreHeadPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "TOVAPolicy",
    "get_policy",
    "register_policy",
]
