"""Countdown: generator, search traces, and the task class (prompt, parser, verifier) in one module.

:class:`Countdown` (the registered task, :data:`TASK`) is the prompt, the parser and the verifier; the
RL reward (``TASK.reward_func``, logged as ``countdown_reward``) and evaluation both call ``TASK.score``,
so they cannot disagree (nanochat's "task = prompt + verifier").

Instances follow ``Jiayi-Pan/Countdown-Tasks-3to4`` (Stream-of-Search generator): a target drawn
from [10, 100], 3-4 numbers drawn uniformly from [1, 99], numbers redrawn until a depth-first search
reaches the target with +, x, subtraction of the smaller from the larger and exact division (every
intermediate a non-negative integer).

Verifier decisions (TinyZero's ``eval`` loopholes closed)
--------------------------------------------------------
* The expression is parsed with ``ast.parse(mode="eval")`` and walked; nothing is ever executed.
* Allowed: non-negative integer literals, binary ``+ - * /``, parentheses, whitespace; the unicode
  operators ``×`` ``÷`` ``−`` are normalised first. Rejected: ``**``, ``//``, ``%``, decimals, names,
  calls, attributes, comparisons, ``=``, and **unary minus/plus** (``-3+5`` uses a number that was not
  given).
* The literals must equal the given numbers as a multiset (each used exactly once).
* Arithmetic is exact (:class:`fractions.Fraction`). **Non-integer and negative intermediates are
  accepted** (``(8/3)*3`` is 8), as in TinyZero, which evaluates with floats; only the final value must
  equal the target exactly. The generator and :func:`solve` use integer intermediates only.
* Bounds: 200 characters, 400 AST nodes, ``|numerator|, denominator <= 10**100``; division by zero,
  any bound exceeded or any parse error gives ``False``.

Search-trace format (SFT data for the tiny testbed)
---------------------------------------------------
:func:`search_trace` writes an *honest* depth-first search: moves are tried in a fixed order
(canonical, or shuffled per node), every result is computed, and the trace stops at the first
two-number state that yields the target. No line states anything the lines above it do not imply,
so a model that imitates the trace never learns to announce a success it has not computed. Each line
works on the state written on the line just above it; the target, given in the prompt, is restated on
every two-number line, and the token right after a result says whether it is the target (``" "`` before
``yes``; ``","`` otherwise), so the decision is made at the result itself by comparing it with a number a
few tokens back rather than hundreds (``restate_target=False`` leaves the restatement out)::

    a<op>b=c left S'           a move: combine a >= b into c; S' = the untouched numbers in order, then c
    target T: a+b=c,...,no     two numbers left: every result in the order + - * /, none is the target
    target T: a+b=c,a-b=T yes  ... or the results up to the first that is the target
    back S                     return to state S before its next move
    found <moves>              the moves of the solving path
    </think>
    <answer>EXPR</answer>      EXPR fully parenthesised, larger operand first

Canonical move order: number pairs ``(i, j)``, ``i < j``, by position in the state, then ``+ - * /``
(``-`` only when ``a > b``, ``/`` only when exact). Example (``search_trace([4, 4, 10], 44)``)::

    4+4=8 left 10 8
    target 44: 10+8=18,10-8=2,10*8=80,no
    back 4 4 10
    4*4=16 left 10 16
    target 44: 16+10=26,16-10=6,16*10=160,no
    back 4 4 10
    4/4=1 left 10 1
    target 44: 10+1=11,10-1=9,10*1=10,10/1=10,no
    back 4 4 10
    10+4=14 left 4 14
    target 44: 14+4=18,14-4=10,14*4=56,no
    back 4 4 10
    10-4=6 left 4 6
    target 44: 6+4=10,6-4=2,6*4=24,no
    back 4 4 10
    10*4=40 left 4 40
    target 44: 40+4=44 yes
    found 10*4=40 40+4=44
    </think>
    <answer>(10*4)+4</answer>

Lengths: 3 numbers from [1, 10], targets in [10, 50]: 95-655 characters (5th-95th percentile, median
~245). With 4 numbers the exhaustive search can run to thousands of
characters; ``max_chars`` lets a caller skip such instances.

Prompts
-------
* ``TASK.build_prompt(row)``: chat messages in TinyZero's wording, for models with a chat template
  (Qwen2.5-Instruct with ``prefill=True``; DeepSeek-R1-Distill with ``prefill=False``, its template
  opens ``<think>`` itself).
* ``TASK.build_plain_prompt(row)``: ``"nums 3 5 7 8 target 24\\n<think>"``, for tiny models whose
  tokenizer has no chat template. ``build_plain_prompt(row) + search_trace(...)`` is one SFT example.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from ngc_trl.tasks.base import GeneratedTask

HUB_NAME = "Jiayi-Pan/Countdown-Tasks-3to4"
TRAIN_ROWS = 327_680  # TinyZero: train on rows [0, 327680), test on the next 1024
TEST_ROWS = 1_024
MAX_ANSWER_CHARS = 200
MAX_AST_NODES = 400
MAX_MAGNITUDE = 10**100
TEST_BUCKETS = 16  # generated instances whose hash % 16 == 0 form the test split

# named generator settings: ``TASK.load("generated:<name>")``
DISTRIBUTIONS: dict[str, dict[str, Any]] = {
    # Countdown-Tasks-3to4 (Stream-of-Search / TinyZero)
    "standard": dict(
        count_range=(3, 4), num_range=(1, 99), target_range=(10, 100), test_buckets=TEST_BUCKETS
    ),
    # the offline tiny testbed (ngc_trl.testbed): learnable by a ~1M-parameter model in minutes on CPU;
    # ~2,600 solvable instances, so a 1/4 test split keeps >= 256 distinct held-out instances
    "testbed": dict(count_range=(3, 3), num_range=(1, 12), target_range=(10, 60), test_buckets=4),
}

_UNICODE_OPS = str.maketrans({"×": "*", "÷": "/", "−": "-"})
_ALLOWED_CHARS = frozenset("0123456789+-*/() ")
_BINOPS = {
    ast.Add: Fraction.__add__,
    ast.Sub: Fraction.__sub__,
    ast.Mult: Fraction.__mul__,
    ast.Div: Fraction.__truediv__,
}
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.Constant, *_BINOPS)


# ----------------------------------------------------------------------------- search primitives
def _combine(a: int, b: int) -> list[tuple[str, int]]:
    """Results of combining ``a >= b``: ``+``, ``*``, ``a-b`` and exact ``a/b``."""
    out = [("+", a + b), ("*", a * b), ("-", a - b)]
    if b and a % b == 0:
        out.append(("/", a // b))
    return out


def _can_reach(nums: tuple[int, ...], target: int) -> bool:
    """Whether the multiset ``nums`` reaches ``target`` with integer intermediates (early exit DFS)."""
    n = len(nums)
    if n == 1:
        return nums[0] == target
    if n == 2:
        a, b = (nums[0], nums[1]) if nums[0] >= nums[1] else (nums[1], nums[0])
        return (
            a + b == target
            or a * b == target
            or a - b == target
            or (b != 0 and a % b == 0 and a // b == target)
        )
    for i in range(n):
        for j in range(i + 1, n):
            a, b = (nums[i], nums[j]) if nums[i] >= nums[j] else (nums[j], nums[i])
            rest = nums[:i] + nums[i + 1 : j] + nums[j + 1 :]
            for _, c in _combine(a, b):
                if _can_reach(rest + (c,), target):
                    return True
    return False


def _moves(state: tuple[int, ...]) -> list[tuple[int, str, int, int, tuple[int, ...]]]:
    """Moves ``(a, op, b, c, child_state)`` from a sorted state, one per distinct child state."""
    out, seen = [], set()
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            b, a = state[i], state[j]
            rest = state[:i] + state[i + 1 : j] + state[j + 1 :]
            for op, c in _combine(a, b):
                child = tuple(sorted(rest + (c,)))
                if child not in seen:
                    seen.add(child)
                    out.append((a, op, b, c, child))
    return out


def _expression(nums: Sequence[int], steps: Sequence[tuple]) -> str:
    """Replay ``steps`` ``(a, op, b, c, ...)`` on ``nums``: a fully parenthesised expression."""
    pool: dict[int, list[str]] = {}
    for x in nums:
        pool.setdefault(x, []).append(str(x))
    for a, op, b, c, *_ in steps:
        ea = pool[a].pop()
        eb = pool[b].pop()
        pool.setdefault(c, []).append(f"({ea}{op}{eb})")
    (expr,) = [e for exprs in pool.values() for e in exprs]
    return expr[1:-1] if expr.startswith("(") else expr


def _find_path(state: tuple[int, ...], target: int) -> list[tuple] | None:
    if len(state) == 1:
        return [] if state[0] == target else None
    for move in _moves(state):
        if _can_reach(move[4], target):
            rest = _find_path(move[4], target)
            if rest is not None:
                return [move, *rest]
    return None


def solve(nums: Sequence[int], target: int) -> str | None:
    """A fully parenthesised solution (e.g. ``"(8-5)*8"``) with non-negative integer intermediates.

    Returns ``None`` when the instance has no solution under the generator's semantics.
    """
    nums = [int(x) for x in nums]
    path = _find_path(tuple(sorted(nums)), int(target))
    return None if path is None else _expression(nums, path)


# ----------------------------------------------------------------------------- generator
def _split_of(nums: Sequence[int], target: int, test_buckets: int = TEST_BUCKETS) -> str:
    """``"test"`` for ``1/test_buckets`` of all instances (stable hash of the sorted numbers and target), else
    ``"train"``."""
    key = f"{sorted(nums)}|{target}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % test_buckets
    return "test" if bucket == 0 else "train"


def generate_problems(
    n: int,
    seed: int,
    *,
    count_range: tuple[int, int] = (3, 4),
    num_range: tuple[int, int] = (1, 99),
    target_range: tuple[int, int] = (10, 100),
    split: str | None = None,
    test_buckets: int = TEST_BUCKETS,
    unique: bool = False,
    max_draws: int = 100_000,
) -> list[dict]:
    """Generate ``n`` solvable instances, deterministically for a seed.

    Per instance: draw a target from ``target_range`` and a count from ``count_range``, then draw the
    numbers uniformly from ``num_range`` until :func:`_can_reach` succeeds (the target is kept, as in
    Stream-of-Search, unless 1,000 draws fail: then target and count are redrawn, which small ranges
    need). All ranges are inclusive.

    Parameters
    ----------
    n, seed : int
    count_range, num_range, target_range : (int, int)
    split : {"train", "test"} or None
        Keep only instances of that hash split (disjoint whatever the seeds and sizes); ``None``
        keeps all.
    test_buckets : int
        The test split is ``1/test_buckets`` of all instances (16: a small held-out set for large
        ranges; the tiny testbed's small range uses 4 to have >= 256 distinct test instances).
    unique : bool
        Never repeat an instance (same multiset of numbers and target), e.g. for a held-out set drawn
        from a small range.
    max_draws : int
        Draws allowed for one instance before ``RuntimeError`` (ranges with no solvable instance).

    Returns
    -------
    list of dict
        ``{"nums": list[int], "target": int}``, numbers in drawn order.
    """
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(n):
        target = rng.randint(*target_range)
        count = rng.randint(*count_range)
        for draw in range(1, max_draws + 1):
            if draw % 1000 == 0:
                target, count = rng.randint(*target_range), rng.randint(*count_range)
            nums = [rng.randint(*num_range) for _ in range(count)]
            if split is not None and _split_of(nums, target, test_buckets) != split:
                continue
            key = (tuple(sorted(nums)), target)
            if unique and key in seen:
                continue
            if _can_reach(tuple(nums), target):
                seen.add(key)
                out.append({"nums": nums, "target": target})
                break
        else:
            raise RuntimeError(f"no solvable instance in {max_draws} draws (last target {target})")
    return out


# ----------------------------------------------------------------------------- search traces
def _trace_moves(state: list[tuple[int, str]], rng: random.Random | None) -> list[tuple]:
    """Moves ``(a, op, b, c, expr, child)`` from an ordered state of ``(value, expression)`` pairs.

    Canonical order: pairs ``(i, j)``, ``i < j``, by position in the state; the larger value first;
    operators in the order ``+ - * /`` (``-`` only when ``a > b``, ``/`` only when exact). The child
    state keeps the untouched numbers in order and appends the result. ``rng`` shuffles the moves.
    """
    out = []
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            (a, ea), (b, eb) = (state[i], state[j]) if state[i][0] >= state[j][0] else (state[j], state[i])
            rest = [s for k, s in enumerate(state) if k not in (i, j)]
            for op, c in (("+", a + b), ("-", a - b), ("*", a * b), ("/", a // b if b else 0)):
                if (op == "-" and a <= b) or (op == "/" and (b == 0 or a % b)):
                    continue
                expr = f"({ea}{op}{eb})"
                out.append((a, op, b, c, expr, [*rest, (c, expr)]))
    if rng is not None:
        rng.shuffle(out)
    return out


class _TraceTooLong(Exception):
    pass


class _TraceWriter:
    """Writes an honest depth-first search: every line follows from the lines above it."""

    def __init__(self, target: int, rng: random.Random | None, max_chars: int | None, restate_target: bool):
        self.target, self.rng, self.max_chars = target, rng, max_chars
        self.prefix = f"target {target}: " if restate_target else ""
        self.lines: list[str] = []
        self.chars = 0

    def emit(self, line: str) -> None:
        self.lines.append(line)
        self.chars += len(line) + 1
        if self.max_chars is not None and self.chars > self.max_chars:
            raise _TraceTooLong

    def leaf(self, state: list[tuple[int, str]]) -> list[tuple] | None:
        shown = []
        for a, op, b, c, expr, _ in _trace_moves(state, self.rng):
            shown.append(f"{a}{op}{b}={c}")
            if c == self.target:  # " " right after a result marks the target, "," any other result
                self.emit(self.prefix + ",".join(shown) + " yes")
                return [(a, op, b, c, expr)]
        self.emit(self.prefix + ",".join(shown) + ",no")
        return None

    def explore(self, state: list[tuple[int, str]]) -> list[tuple] | None:
        if len(state) == 2:
            return self.leaf(state)
        for k, (a, op, b, c, expr, child) in enumerate(_trace_moves(state, self.rng)):
            if k:
                self.emit("back " + " ".join(str(v) for v, _ in state))
            self.emit(f"{a}{op}{b}={c} left " + " ".join(str(v) for v, _ in child))
            path = self.explore(child)
            if path is not None:
                return [(a, op, b, c, expr), *path]
        return None


def search_trace(
    nums: Sequence[int],
    target: int,
    rng: random.Random | None = None,
    *,
    max_chars: int | None = None,
    restate_target: bool = True,
) -> str | None:
    """A depth-first search chain of thought that ends in a verifying ``<answer>`` (module docstring).

    The search is honest: moves are tried in order (canonical, or shuffled per node by ``rng``), every
    result is computed, and the trace stops at the first two-number state that yields the target, so
    a model trained on it never sees a conclusion it could not have derived from the lines above.

    Parameters
    ----------
    nums : sequence of int
        At least two numbers; the instance must be solvable (:func:`_can_reach`).
    target : int
    rng : random.Random or None
        ``None`` tries the moves in the canonical order (deterministic traces); else shuffles them.
    max_chars : int or None
        Return ``None`` when the search would need more than this many characters (without the
        answer lines): the caller skips the instance.
    restate_target : bool
        Open every two-number line with ``"target T: "``, so that the yes/no decision compares a result
        with a number a few tokens back instead of one in the prompt, hundreds of tokens back
        (``False``: the earlier format, which a 1M-parameter model decided wrongly far more often).

    Returns
    -------
    str or None
        The completion text after a prompt ending in ``<think>``: starts with ``"\\n"``, ends with
        ``"</think>\\n<answer>EXPR</answer>"``.
    """
    nums = [int(x) for x in nums]
    target = int(target)
    if len(nums) < 2:
        raise ValueError("search_trace needs at least two numbers")
    if not _can_reach(tuple(nums), target):
        raise ValueError(f"unsolvable instance: {nums} -> {target}")
    writer = _TraceWriter(target, rng, max_chars, restate_target)
    try:
        path = writer.explore([(x, str(x)) for x in nums])
    except _TraceTooLong:
        return None
    assert path is not None, "an exhaustive search of a solvable instance finds a solution"
    writer.lines.append("found " + " ".join(f"{a}{op}{b}={c}" for a, op, b, c, _ in path))
    writer.lines.append("</think>")
    expr = path[-1][4]
    writer.lines.append(f"<answer>{expr[1:-1]}</answer>")
    return "\n" + "\n".join(writer.lines)


# ----------------------------------------------------------------------------- verifier internals
class _Reject(Exception):
    pass


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if not isinstance(node, ast.BinOp) or type(node.op) not in _BINOPS:
        raise _Reject
    value = _BINOPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _Reject
    return value


# ----------------------------------------------------------------------------- the task
class Countdown(GeneratedTask):
    """Countdown (module docstring): rows ``{"nums": list[int], "target": int}``; answers are arithmetic
    expressions in ``<answer>`` tags, checked by an AST walk with exact rationals (never executed)."""

    name = "countdown"
    columns = ("nums", "target")
    distributions = DISTRIBUTIONS
    max_answer_chars = MAX_ANSWER_CHARS
    splits = ("train", "test", "all")
    reads_sources = True

    def generate(self, n: int, seed: int, *, split: str | None = None, **ranges: Any) -> list[dict]:
        """:func:`generate_problems`."""
        return generate_problems(n, seed, split=split, **ranges)

    def generator_options(self, name: str, split: str, ranges: dict[str, Any]) -> dict[str, Any]:
        """The test split of a named distribution other than ``"standard"`` has no repeated instance."""
        if split == "test" and name != "standard":
            ranges.setdefault("unique", True)
        return ranges

    def read(self, source: str, n: int | None, split: str) -> list[dict]:
        """Rows of a Hub dataset (e.g. :data:`HUB_NAME`) or a local ``.jsonl``/``.json``/``.parquet`` file with
        ``nums`` and ``target``: TinyZero's rows [0, 327680) (``"train"``), the next 1,024 (``"test"``) or every
        row (``"all"``); the first ``n`` of them when given."""
        import datasets

        ext = os.path.splitext(source)[1].lower()
        if os.path.exists(source):
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext)
            if builder is None:
                raise ValueError(f"unsupported file type {ext!r}: use .jsonl, .json or .parquet")
            ds = datasets.load_dataset(builder, data_files=source, split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
        lo, hi = {
            "train": (0, TRAIN_ROWS),
            "test": (TRAIN_ROWS, TRAIN_ROWS + TEST_ROWS),
            "all": (0, len(ds)),
        }[split]
        hi = min(hi, len(ds), lo + n if n is not None else hi)
        ds = ds.select(range(lo, hi) if lo < hi else [])
        return [{"nums": a, "target": t} for a, t in zip(ds["nums"], ds["target"])]

    def instance(self, row: Mapping[str, Any]) -> dict:
        """``{"nums": [int, ...], "target": int}`` (plain ints, whatever the source's types)."""
        return {"nums": [int(x) for x in row["nums"]], "target": int(row["target"])}

    def instance_key(self, row: Mapping[str, Any]) -> tuple:
        """The sorted numbers and the target (the order of the numbers does not change the instance)."""
        return tuple(sorted(int(x) for x in row["nums"])), int(row["target"])

    def prompt_content(self, row: Mapping[str, Any]) -> str:
        """TinyZero's Countdown user message."""
        numbers = "[" + ", ".join(str(int(x)) for x in row["nums"]) + "]"
        return (
            f"Using the numbers {numbers}, create an equation that equals {int(row['target'])}. You can use "
            "basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
            "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
            "<answer> (1 + 2) / 3 </answer>."
        )

    def plain_line(self, row: Mapping[str, Any]) -> str:
        """``"nums 3 5 7 8 target 24"`` (the plain prompt adds ``"\\n<think>"``; :func:`search_trace`
        continues it)."""
        return "nums " + " ".join(str(int(x)) for x in row["nums"]) + f" target {int(row['target'])}"

    def verify(self, answer: str, row: Mapping[str, Any]) -> bool:
        """Whether the expression ``answer`` uses each of ``row["nums"]`` exactly once and equals
        ``row["target"]`` exactly.

        Never executes the input and never raises on it (see the module docstring for the grammar).
        """
        if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
            return False
        expr = " ".join(answer.translate(_UNICODE_OPS).split())
        if not expr or not _ALLOWED_CHARS.issuperset(expr):
            return False
        try:
            tree = ast.parse(expr, mode="eval")
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return False
        literals = []
        for count, node in enumerate(ast.walk(tree)):
            if count >= MAX_AST_NODES or not isinstance(node, _ALLOWED_NODES):
                return False
            if isinstance(node, ast.Constant):
                if type(node.value) is not int:
                    return False
                literals.append(node.value)
        if Counter(literals) != Counter(int(x) for x in row["nums"]):
            return False
        try:
            return _evaluate(tree.body) == int(row["target"])
        except (_Reject, ZeroDivisionError, RecursionError):
            return False


TASK = Countdown()
