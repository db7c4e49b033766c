"""StarGraph: path-star graphs (Bachmann & Nagarajan, "The Pitfalls of Next-Token Prediction"), in one module.

Generator, solution traces and the task class :class:`StarGraph` (:data:`TASK`: prompts, parser and
verifier) live together; the RL reward (``TASK.reward_func``, logged as ``stargraph_reward``) and
evaluation both call ``TASK.score``, so they cannot disagree.

Instances
---------
The graph ``G(d, l)`` of the paper: a source node with ``d`` arms (``degree``, default 3), each a
directed chain, so that the path from the source to the end of any arm has ``l`` nodes including the
source (``path_length``, default 4-5; ``d * (l - 1) + 1`` nodes in all). Node labels are distinct
integers drawn uniformly from ``label_range`` (default [0, 99]). The goal is the last node of one arm,
drawn uniformly. Edges point away from the source and are listed in a random order as ``a>b`` (an
edge from ``a`` to ``b``). Instance dicts: ``{"edges": [[a, b], ...], "source": int, "goal": int}``
(plain lists, Arrow/JSON friendly). Train/test: an instance is ``"test"`` when a stable hash of its
sorted edges, source and goal falls in bucket 0 of 16; splits are disjoint whatever the seeds.

Answer format and verifier
--------------------------
The answer is the content of the **last** ``<answer>...</answer>`` (at most 400 characters): node
labels from source to goal separated by commas, e.g. ``<answer>12,5,33,40</answer>`` (spaces around
commas allowed). Parsing is a regex (ASCII digits only, at most 12 per label); nothing is evaluated.
The verifier checks the path **against the edge list**: it starts at the source, ends at the goal,
visits no node twice, and every consecutive pair ``a, b`` is a listed edge ``a>b`` (direction
matters). It does not compare with a stored answer.

Solution-trace formats (SFT data for tiny models)
-------------------------------------------------
:func:`solution_trace` walks backwards from the goal along the unique incoming edges, then states
the path::

    goal G                 the node to reach
    a>b                    the edge into the current node b; a becomes the current node
    ...
    start S                the walk reached the source
    </think>
    <answer>S,..,G</answer>

Example (``solution_trace({"edges": [[7, 2], [12, 5], [33, 40], [12, 7], [5, 33]], "source": 12,
"goal": 40})``)::

    goal 40
    33>40
    5>33
    12>5
    start 12
    </think>
    <answer>12,5,33,40</answer>

:func:`search_trace` searches forward instead (the tiny testbed's traces): the source's arms in the
order their first edge appears in the prompt, each walked to its end on one line, ``yes`` at the goal::

    goal G: S>a a>b .. c>d no      one arm, walked to its end d, which is not the goal
    goal G: S>e e>f .. h>G yes     the arm that ends at the goal
    </think>
    <answer>S,e,f,..,h,G</answer>

Example (``search_trace({"edges": [[7, 2], [12, 7], [33, 40], [12, 5], [5, 33]], "source": 12,
"goal": 40})``)::

    goal 40: 12>7 7>2 no
    goal 40: 12>5 5>33 33>40 yes
    </think>
    <answer>12,5,33,40</answer>

Choosing the next arm needs the earlier lines (which first edges were tried) and the answer needs only
the last, so old reasoning loses value as the search goes on: the setting where eviction matters.

Prompts
-------
* ``TASK.build_prompt(row)``: chat messages in the wording of the Countdown prompt (``<think>`` tags,
  ``<answer>`` tags with an example).
* ``TASK.build_plain_prompt(row)``: ``"edges 7>2 12>5 33>40 12>7 5>33 from 12 to 40\\n<think>"`` for tiny
  models without a chat template; ``build_plain_prompt(row) + solution_trace(row)`` is one SFT example.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from ngc_trl.tasks.base import GeneratedTask

MAX_ANSWER_CHARS = 400
MAX_DIGITS = 12
TEST_BUCKETS = 16  # generated instances whose hash % 16 == 0 form the test split

# named generator settings: ``TASK.load("generated:<name>")``
DISTRIBUTIONS: dict[str, dict[str, Any]] = {
    "standard": dict(degree=(3, 3), path_length=(4, 5), label_range=(0, 99)),
    # the offline tiny testbed: every label one token of the number tokenizer; ~59-token prompts, ~38-token traces
    "testbed": dict(degree=(3, 3), path_length=(5, 5), label_range=(0, 99)),
}

_PATH = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}(?:[ \t]*,[ \t]*[0-9]{{1,{MAX_DIGITS}}})*")


# ----------------------------------------------------------------------------- graph helpers
def _edge_list(edges: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in edges]


def solve(edges: Sequence[Sequence[int]], source: int, goal: int) -> list[int] | None:
    """A shortest directed path ``[source, ..., goal]`` by breadth-first search; ``None`` if unreachable."""
    source, goal = int(source), int(goal)
    adjacency: dict[int, list[int]] = {}
    for a, b in _edge_list(edges):
        adjacency.setdefault(a, []).append(b)
    parent: dict[int, int | None] = {source: None}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path[::-1]
        for nxt in adjacency.get(node, ()):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def arms(edges: Sequence[Sequence[int]], source: int) -> list[list[int]]:
    """The chains leaving ``source``, each followed while its node has exactly one outgoing edge.

    For a path-star graph: ``d`` lists of ``l - 1`` nodes (source excluded), in edge-list order.
    """
    adjacency: dict[int, list[int]] = {}
    for a, b in _edge_list(edges):
        adjacency.setdefault(a, []).append(b)
    out = []
    for first in adjacency.get(int(source), []):
        chain, seen = [first], {int(source), first}
        while len(adjacency.get(chain[-1], [])) == 1 and adjacency[chain[-1]][0] not in seen:
            chain.append(adjacency[chain[-1]][0])
            seen.add(chain[-1])
        out.append(chain)
    return out


# ----------------------------------------------------------------------------- generator
def _split_of(edges: Sequence[Sequence[int]], source: int, goal: int) -> str:
    """``"test"`` for 1/16 of all instances (stable hash of sorted edges, source, goal), else ``"train"``."""
    key = f"{sorted(_edge_list(edges))}|{int(source)}|{int(goal)}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def generate_problems(
    n: int,
    seed: int,
    *,
    split: str | None = None,
    degree: tuple[int, int] = (3, 3),
    path_length: tuple[int, int] = (4, 5),
    label_range: tuple[int, int] = (0, 99),
    max_draws: int = 100_000,
) -> list[dict]:
    """Generate ``n`` path-star graphs, deterministically for a seed.

    Per instance: draw ``d`` from ``degree`` and ``l`` from ``path_length``, then ``d * (l - 1) + 1``
    distinct labels from ``label_range`` (the first is the source, the next ``l - 1`` the first arm,
    ...), the goal arm, and a shuffled edge order; redrawn only to land in ``split``. All ranges are
    inclusive. Instance ``i`` depends only on the seed (a shorter run is a prefix).

    Parameters
    ----------
    n, seed : int
    split : {"train", "test"} or None
        Keep only instances of that hash split (disjoint whatever the seeds); ``None`` keeps all.
    degree : (int, int)
        Number of arms ``d >= 1``.
    path_length : (int, int)
        Nodes on a source-to-leaf path, source included, ``l >= 2``.
    label_range : (int, int)
        Must hold at least ``d * (l - 1) + 1`` labels.
    max_draws : int
        Draws allowed for one instance before ``RuntimeError``.

    Returns
    -------
    list of dict
        ``{"edges": list[[int, int]], "source": int, "goal": int}``.
    """
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    if degree[0] < 1 or path_length[0] < 2:
        raise ValueError(f"need degree >= 1 and path_length >= 2, got {degree}, {path_length}")
    lo, hi = label_range
    if hi - lo + 1 < degree[1] * (path_length[1] - 1) + 1:
        raise ValueError(
            f"label_range {label_range} is too small for {degree[1]} arms of {path_length[1]} nodes"
        )
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d, length = rng.randint(*degree), rng.randint(*path_length)
        for _ in range(max_draws):
            labels = rng.sample(range(lo, hi + 1), d * (length - 1) + 1)
            source, rest = labels[0], labels[1:]
            chains = [rest[i * (length - 1) : (i + 1) * (length - 1)] for i in range(d)]
            edges = [[a, b] for chain in chains for a, b in zip([source, *chain[:-1]], chain)]
            rng.shuffle(edges)
            goal = chains[rng.randrange(d)][-1]
            if split is None or _split_of(edges, source, goal) == split:
                out.append({"edges": edges, "source": source, "goal": goal})
                break
        else:
            raise RuntimeError(f"no instance of split {split!r} in {max_draws} draws")
    return out


# ----------------------------------------------------------------------------- solution traces
def solution_trace(problem: Mapping[str, Any], rng: random.Random | None = None) -> str:
    """Walk back from the goal to the source, then answer (format: module docstring).

    Parameters
    ----------
    problem : mapping
        ``edges``, ``source``, ``goal``; the goal must be reachable from the source.
    rng : random.Random, optional
        Unused (the trace is deterministic); accepted for the same signature as the other tasks.

    Returns
    -------
    str
        The completion after a prompt ending in ``<think>``: starts with ``"\\n"``, ends with
        ``"</think>\\n<answer>S,..,G</answer>"``. ``ValueError`` if the goal is unreachable.
    """
    source, goal = int(problem["source"]), int(problem["goal"])
    path = solve(problem["edges"], source, goal)
    if path is None:
        raise ValueError(f"goal {goal} is not reachable from {source}")
    lines = [f"goal {goal}"]
    lines += [f"{path[i - 1]}>{path[i]}" for i in range(len(path) - 1, 0, -1)]
    lines.append(f"start {source}")
    return "\n" + "\n".join(lines) + "\n</think>\n<answer>" + ",".join(map(str, path)) + "</answer>"


def search_trace(problem: Mapping[str, Any], *, restate_goal: bool = True) -> str:
    """A forward depth-first search from the source, arm by arm, then the answer (module docstring).

    The arms leaving the source are tried in the order their first edge appears in the prompt; each line
    walks one arm edge by edge to its end and says ``yes`` if that end is the goal, ``no`` otherwise.
    Like Countdown's :func:`~ngc_trl.tasks.countdown.search_trace` it is honest (no line claims what the
    lines above do not imply) and old lines lose value: choosing the next arm needs to know which first
    edges were tried (the earlier lines), and the answer copies the last line only.

    Parameters
    ----------
    problem : mapping
        ``edges``, ``source``, ``goal`` of a path-star graph whose goal ends one of the source's arms.
    restate_goal : bool
        Open every line with ``"goal G: "`` so that the ``yes``/``no`` decision compares the arm's end with
        a number a few tokens back rather than one in the prompt.

    Returns
    -------
    str
        The completion after a prompt ending in ``<think>``: starts with ``"\\n"``, ends with
        ``"</think>\\n<answer>S,..,G</answer>"``. ``ValueError`` if no arm ends at the goal.
    """
    source, goal = int(problem["source"]), int(problem["goal"])
    lines = []
    for arm in arms(problem["edges"], source):
        walk = [source, *arm]
        steps = " ".join(f"{a}>{b}" for a, b in zip(walk, walk[1:]))
        hit = arm[-1] == goal
        lines.append((f"goal {goal}: " if restate_goal else "") + steps + (" yes" if hit else " no"))
        if hit:
            return "\n" + "\n".join(lines) + "\n</think>\n<answer>" + ",".join(map(str, walk)) + "</answer>"
    raise ValueError(f"no arm from {source} ends at the goal {goal}")


# ----------------------------------------------------------------------------- the task
def format_edges(edges: Sequence[Sequence[int]], sep: str = ", ") -> str:
    """Edges as ``a>b`` joined by ``sep``, in the given (shuffled) order."""
    return sep.join(f"{a}>{b}" for a, b in _edge_list(edges))


class StarGraph(GeneratedTask):
    """StarGraph (module docstring): rows ``{"edges": [[a, b], ...], "source": int, "goal": int}``; answers
    are comma-separated paths in ``<answer>`` tags, checked against the edge list."""

    name = "stargraph"
    columns = ("edges", "source", "goal")
    distributions = DISTRIBUTIONS
    max_answer_chars = MAX_ANSWER_CHARS

    def generate(self, n: int, seed: int, *, split: str | None = None, **ranges: Any) -> list[dict]:
        """:func:`generate_problems`."""
        return generate_problems(n, seed, split=split, **ranges)

    def instance_key(self, row: Mapping[str, Any]) -> tuple:
        """The sorted edges, the source and the goal (the order of the edges does not change the graph)."""
        return tuple(sorted((int(a), int(b)) for a, b in row["edges"])), int(row["source"]), int(row["goal"])

    def prompt_content(self, row: Mapping[str, Any]) -> str:
        """The user message, in the wording of the Countdown prompt (``<think>`` tags, ``<answer>`` tags
        with an example); the edges in their given (shuffled) order."""
        return (
            f"A directed graph is given by its edges, where a>b is an edge from node a to node b: "
            f"{format_edges(row['edges'])}. Find the path from node {int(row['source'])} to node "
            f"{int(row['goal'])}. Show your work in <think> </think> tags. And return the final answer in "
            "<answer> </answer> tags as the nodes of the path in order, separated by commas, for example "
            "<answer>1,8,3,5</answer>."
        )

    def plain_line(self, row: Mapping[str, Any]) -> str:
        """``"edges 7>2 12>5 from 12 to 2"`` (the plain prompt adds ``"\\n<think>"``; a trace continues it)."""
        return f"edges {format_edges(row['edges'], ' ')} from {int(row['source'])} to {int(row['goal'])}"

    def parse_path(self, answer: str) -> list[int] | None:
        """``"12, 5,33"`` -> ``[12, 5, 33]``; ``None`` unless the whole string is comma-separated ASCII
        integers. At most 400 characters and 12 digits per label; nothing is evaluated."""
        if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
            return None
        answer = answer.strip(" \t\r\n")
        if not _PATH.fullmatch(answer):
            return None
        return [int(x) for x in answer.split(",")]

    def verify(self, answer: str, row: Mapping[str, Any]) -> bool:
        """Whether ``answer`` is a path from ``row["source"]`` to ``row["goal"]`` along the listed directed
        ``row["edges"]``, no node twice. Never evaluates the input and never raises on it."""
        path = self.parse_path(answer)
        if path is None or path[0] != int(row["source"]) or path[-1] != int(row["goal"]):
            return False
        if len(set(path)) != len(path):
            return False
        edges = set(_edge_list(row["edges"]))
        return all((a, b) in edges for a, b in zip(path, path[1:]))


TASK = StarGraph()
