"""Tasks by name: one :class:`~ngc_trl.tasks.base.Task` object per task, with its data, prompt, bounded
answer parser and verifier (:mod:`ngc_trl.tasks.base` describes the interface).

``get_task(name)`` returns the task object registered in :data:`TASKS`; training, evaluation, the tiny
testbed and the benchmarks call its ``load`` (a split as a ``datasets.Dataset``), ``score(text, row)`` (the
RL reward and the evaluation's correctness) and ``reward_func`` (the TRL reward function). The generated
tasks (``task.generated``: Countdown, LinSys, StarGraph) also load ``"generated:<distribution>"`` sources,
named entries of their ``distributions``.
"""

from __future__ import annotations

from ngc_trl.tasks import countdown, linsys, math, stargraph
from ngc_trl.tasks.base import GeneratedTask, Task

TASKS: dict[str, Task] = {
    "countdown": countdown.TASK,
    "math": math.TASK,
    "linsys": linsys.TASK,
    "stargraph": stargraph.TASK,
}
GENERATED_TASKS = tuple(name for name, task in TASKS.items() if task.generated)


def get_task(name: str) -> Task:
    """The task registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None


__all__ = [
    "GENERATED_TASKS",
    "TASKS",
    "GeneratedTask",
    "Task",
    "countdown",
    "get_task",
    "linsys",
    "math",
    "stargraph",
]
