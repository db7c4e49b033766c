"""ngc-trl: Neural Garbage Collection on TRL — a reasoning model that learns to evict its own KV cache
(and Breadcrumbs Reasoning: a student that compresses its cache into beacon tokens).

Light imports (the engine) load eagerly; the TRL-dependent pieces load on first use.
"""

from ngc_trl.breadcrumbs.beacons import add_beacon_token, beacon_forward, beacon_layout
from ngc_trl.engine.config import BeaconConfig, EvictionConfig
from ngc_trl.engine.generation import EvictionOutput, generate_with_eviction
from ngc_trl.engine.records import EvictionRecords
from ngc_trl.policies import POLICIES, get_policy

__version__ = "0.1.0"

_LAZY = {
    "BreadcrumbsConfig": "ngc_trl.breadcrumbs.config",
    "BreadcrumbsTrainer": "ngc_trl.breadcrumbs.trainer",
    "NGCConfig": "ngc_trl.ngc.config",
    "NGCTrainer": "ngc_trl.ngc.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ngc_trl' has no attribute {name!r}")


__all__ = [
    "POLICIES",
    "BeaconConfig",
    "BreadcrumbsConfig",
    "BreadcrumbsTrainer",
    "EvictionConfig",
    "EvictionOutput",
    "EvictionRecords",
    "NGCConfig",
    "NGCTrainer",
    "add_beacon_token",
    "beacon_forward",
    "beacon_layout",
    "generate_with_eviction",
    "get_policy",
]
