"""Tasks by name: each module holds its prompt, answer parser, verifier/grader and dataset loader.

Every task module exposes ``build_prompt``, ``extract_answer``, a TRL reward function
``reward_func`` (``countdown_reward`` / ``math_reward`` / ``linsys_reward`` / ``stargraph_reward``)
and a loader (``load_countdown`` / ``load_math`` / ``load_linsys`` / ``load_stargraph``).
"""

from __future__ import annotations

from types import ModuleType

from ngc_trl.tasks import countdown, linsys, math, stargraph

TASKS: dict[str, ModuleType] = {"countdown": countdown, "math": math, "linsys": linsys, "stargraph": stargraph}


def get_task(name: str) -> ModuleType:
    """The task module registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None


__all__ = ["TASKS", "countdown", "get_task", "linsys", "math", "stargraph"]
