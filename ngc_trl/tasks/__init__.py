"""Tasks by name: each module holds its prompt, answer parser, verifier/grader and dataset loader.

Every task module exposes ``build_prompt``, ``extract_answer``, a TRL reward function
``reward_func`` (``countdown_reward`` / ``math_reward`` / ``linsys_reward`` / ``stargraph_reward``)
and a loader (``load_countdown`` / ``load_math`` / ``load_linsys`` / ``load_stargraph``). The generated
tasks (Countdown, LinSys, StarGraph) also share one interface here, which training, evaluation and the
tiny testbed use: :func:`load_generated` (``"generated"`` or ``"generated:<distribution>"``, a named
entry of the module's ``DISTRIBUTIONS``) and :func:`score_row` (the module's verifier on a dataset row,
whose instance columns are :data:`COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ngc_trl.tasks import countdown, linsys, math, stargraph

TASKS: dict[str, ModuleType] = {
    "countdown": countdown,
    "math": math,
    "linsys": linsys,
    "stargraph": stargraph,
}
# the instance columns of each generated task, in the order its `score` and `build_plain_prompt` take them
COLUMNS: dict[str, tuple[str, ...]] = {
    "countdown": ("nums", "target"),
    "linsys": ("coeffs", "rhs"),
    "stargraph": ("edges", "source", "goal"),
}
GENERATED_TASKS = tuple(COLUMNS)


def get_task(name: str) -> ModuleType:
    """The task module registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}") from None


def distribution(name: str, source: str = "generated") -> dict[str, Any]:
    """The generator ranges that ``source`` (``"generated"`` = ``"generated:standard"``, or
    ``"generated:<name>"``) names in the module's ``DISTRIBUTIONS``; ``ValueError`` naming the valid ones."""
    module = get_task(name)
    dists = getattr(module, "DISTRIBUTIONS", None)
    if name not in GENERATED_TASKS or dists is None:
        raise ValueError(f"task {name!r} has no generator")
    if source != "generated" and not source.startswith("generated:"):
        raise ValueError(
            f"task {name!r}: data source must be 'generated' or 'generated:<name>', got {source!r}"
        )
    key = source.partition(":")[2] or "standard"
    if key not in dists:
        raise ValueError(
            f"unknown {name} distribution {key!r} in source {source!r}; "
            f"valid: {', '.join('generated:' + k for k in dists)}"
        )
    return dict(dists[key])


def check_source(name: str, source: str | None) -> None:
    """Fail early (``ValueError``) on a data source task ``name`` cannot load: an unknown
    ``"generated:<name>"`` distribution, or anything but the generator for LinSys and StarGraph (Countdown
    and math also read Hub names and files, checked when they load)."""
    if source is None or name not in GENERATED_TASKS:
        return
    if source.startswith("generated") or name != "countdown":
        distribution(name, source)


def load_generated(
    name: str,
    source: str = "generated",
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    *,
    prompt_format: str = "chat",
    prefill: bool = True,
):
    """A generated task's problems as a ``datasets.Dataset`` (``prompt`` + the :data:`COLUMNS` of ``name``).

    Countdown also takes a Hub name or a local file as ``source`` (:func:`countdown.load_countdown`);
    LinSys and StarGraph are generated only.
    """
    if name == "countdown":
        return countdown.load_countdown(
            source, n=n, seed=seed, split=split, prompt_format=prompt_format, prefill=prefill
        )
    loader = {"linsys": linsys.load_linsys, "stargraph": stargraph.load_stargraph}.get(name)
    if loader is None:
        raise ValueError(f"task {name!r} is not generated; generated tasks: {', '.join(GENERATED_TASKS)}")
    return loader(n, seed, split, prompt_format=prompt_format, prefill=prefill, **distribution(name, source))


def instance_args(name: str, row: Mapping[str, Any]) -> list:
    """The instance of a dataset row of task ``name`` as the positional arguments of its ``score`` and
    ``build_plain_prompt``."""
    return [row[c] for c in COLUMNS[name]]


def score_row(name: str, text: str, row: Mapping[str, Any], format_reward: float = 0.0) -> float:
    """The task's own verifier (its RL reward) on a completion ``text`` for a dataset ``row``."""
    return get_task(name).score(text, *instance_args(name, row), format_reward=format_reward)


__all__ = [
    "COLUMNS",
    "GENERATED_TASKS",
    "TASKS",
    "check_source",
    "countdown",
    "distribution",
    "get_task",
    "instance_args",
    "linsys",
    "load_generated",
    "math",
    "score_row",
    "stargraph",
]
