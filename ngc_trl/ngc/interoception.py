"""Budget-aware interoception (paper §5.3): the eviction rate in force, told to the model in its prompt.

One rate is sampled per group of G rollouts and the same tag is appended to every prompt of the group,
in training (`ngc_trl.ngc.trainer.NGCTrainer`) and at test time (`ngc_trl.evaluation.run`).
"""

from __future__ import annotations

RATE_TAG = "<eviction_rate>{pct}%</eviction_rate>"


def rate_tag(rate: float) -> str:
    """The interoception tag for an eviction rate, e.g. ``<eviction_rate>50%</eviction_rate>``."""
    return RATE_TAG.format(pct=round(rate * 100))


def add_rate_tag(prompt, rate: float):
    """Append the tag to a plain prompt or to the last user turn of a chat prompt (a copy)."""
    tag = rate_tag(rate)
    if isinstance(prompt, str):
        return f"{prompt}{tag}" if prompt.endswith("\n") else f"{prompt}\n{tag}"
    msgs = [dict(m) for m in prompt]
    for m in reversed(msgs):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] = f"{m['content']}\n{tag}"
            break
    return msgs
