"""`breadcrumbs`: beacon decoding (Monea et al., arXiv 2510.13797; method.md §8), not a score rule.

Every ``c`` generated tokens the decode loop feeds a beacon token and evicts the window of ``c`` tokens
it closes, in every layer (`ngc_trl.engine.generation.generate_with_eviction`, `ngc_trl.breadcrumbs.beacons`). Nothing is
scored and no δ/ε/b round ever fires, hence ``evicts = False``; ``beacons = True`` selects the beacon
path. Registered in `ngc_trl.policies.DECODERS`, not in `POLICIES` (which the score-rule baselines and
their tests sweep): it needs its own settings (``compression_ratio``, ``beacon_token_id``).
"""

from __future__ import annotations

import torch

from ngc_trl.engine.policy import EvictionPolicy, LayerView


class BreadcrumbsPolicy(EvictionPolicy):
    """Beacon decoding; `token_scores` keeps everything (no round ever asks for it).

    Returns ``(R, S)`` ``+inf``.
    """

    name = "breadcrumbs"
    evicts = False
    beacons = True

    def token_scores(self, view: LayerView) -> torch.Tensor:
        return torch.full(view.pos.shape, float("inf"), device=view.pos.device)
