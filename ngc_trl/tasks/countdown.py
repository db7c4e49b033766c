"""Countdown: generator, prompt, search traces, parser and verifier in one module.

The RL reward (:func:`countdown_reward`) and evaluation both call :func:`score`, so they cannot
disagree (nanochat's "task = prompt + verifier").

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
:func:`search_trace` writes a depth-first search over the number multiset. Each line operates on the
state written on the line just above it, so no line needs context further back than its
predecessor (and the target, given in the prompt and the ``start`` line)::

    start S to T           root state S (sorted multiset) and target T
    a<op>b=c left S'       a move: combine a >= b into c; S' is the new sorted state
    a+b=c a*b=d ... no     two numbers left: every result checked, none is T (a dead end)
    a+b=c a*b=T yes        ... or one is T (results listed in random order up to the hit)
    back S                 abandon the branch, return to state S; the next move applies to S
    found <moves>          the moves of the solving path
    </think>
    <answer>EXPR</answer>  EXPR fully parenthesised, larger operand first

Example (``search_trace([3, 5, 7, 8], 24, random.Random(1), max_dead_ends=2)``)::

    start 3 5 7 8 to 24
    7-5=2 left 2 3 8
    8+3=11 left 2 11
    11*2=22 11+2=13 11-2=9 no
    back 2 3 8
    8*3=24 left 2 24
    24*2=48 24+2=26 24-2=22 24/2=12 no
    back 3 5 7 8
    8-5=3 left 3 3 7
    7*3=21 left 3 21
    21+3=24 yes
    found 8-5=3 7*3=21 21+3=24
    </think>
    <answer>(7*(8-5))+3</answer>

Moves at each node are tried in a random order; a dead branch is abandoned after 1-3 tries. The
exploration phase never reaches the target; it ends once the trace is longer than a budget drawn
from ``explore_chars`` (or after ``max_dead_ends`` dead ends), then the search walks to a solution.
With the defaults, 4-number traces measure 610-1510 characters (median ~1040); 3-number problems
have smaller trees, so their traces are shorter (~250-950, median ~580).

Prompts
-------
* :func:`build_prompt`: chat messages in TinyZero's wording, for models with a chat template
  (Qwen2.5-Instruct with ``prefill=True``; DeepSeek-R1-Distill with ``prefill=False``, its template
  opens ``<think>`` itself).
* :func:`build_plain_prompt`: ``"nums 3 5 7 8 target 24\\n<think>"``, for tiny models whose tokenizer
  has no chat template. ``build_plain_prompt(...) + search_trace(...)`` is one SFT example.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

PREFILL = "Let me solve this step by step.\n<think>"
HUB_NAME = "Jiayi-Pan/Countdown-Tasks-3to4"
TRAIN_ROWS = 327_680  # TinyZero: train on rows [0, 327680), test on the next 1024
TEST_ROWS = 1_024
MAX_ANSWER_CHARS = 200
MAX_AST_NODES = 400
MAX_MAGNITUDE = 10**100
TEST_BUCKETS = 16  # generated instances whose hash % 16 == 0 form the test split

_UNICODE_OPS = str.maketrans({"×": "*", "÷": "/", "−": "-"})
_ALLOWED_CHARS = frozenset("0123456789+-*/() ")
_BINOPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
           ast.Div: Fraction.__truediv__}
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
        return a + b == target or a * b == target or a - b == target or (
            b != 0 and a % b == 0 and a // b == target)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = (nums[i], nums[j]) if nums[i] >= nums[j] else (nums[j], nums[i])
            rest = nums[:i] + nums[i + 1:j] + nums[j + 1:]
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
            rest = state[:i] + state[i + 1:j] + state[j + 1:]
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
def _split_of(nums: Sequence[int], target: int) -> str:
    """``"test"`` for 1/16 of all instances (stable hash of the sorted numbers and target), else ``"train"``."""
    key = f"{sorted(nums)}|{target}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def generate_problems(n: int, seed: int, *, count_range: tuple[int, int] = (3, 4),
                      num_range: tuple[int, int] = (1, 99), target_range: tuple[int, int] = (10, 100),
                      split: str | None = None, max_draws: int = 100_000) -> list[dict]:
    """Generate ``n`` solvable instances, deterministically for a seed.

    Per instance: draw a target from ``target_range`` and a count from ``count_range``, then draw the
    numbers uniformly from ``num_range`` until :func:`_can_reach` succeeds (the target is kept, as in
    Stream-of-Search). All ranges are inclusive.

    Parameters
    ----------
    n, seed : int
    count_range, num_range, target_range : (int, int)
    split : {"train", "test"} or None
        Keep only instances of that hash split (disjoint whatever the seeds and sizes); ``None``
        keeps all.
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
    out = []
    for _ in range(n):
        target = rng.randint(*target_range)
        count = rng.randint(*count_range)
        for _ in range(max_draws):
            nums = [rng.randint(*num_range) for _ in range(count)]
            if split is not None and _split_of(nums, target) != split:
                continue
            if _can_reach(tuple(nums), target):
                out.append({"nums": nums, "target": target})
                break
        else:
            raise RuntimeError(f"no solvable instance in {max_draws} draws for target {target}")
    return out


# ----------------------------------------------------------------------------- search traces
class _TraceWriter:
    def __init__(self, target: int, rng: random.Random, budget: int, max_dead_ends: int | None):
        self.target, self.rng, self.budget, self.max_dead_ends = target, rng, budget, max_dead_ends
        self.lines: list[str] = []
        self.chars = 0
        self.dead_ends = 0
        self.exploring = budget > 0 and max_dead_ends != 0
        self._solvable: dict[tuple, bool] = {}
        self._dead: dict[tuple, bool] = {}

    def emit(self, line: str) -> None:
        self.lines.append(line)
        self.chars += len(line) + 1

    def solvable(self, state: tuple[int, ...]) -> bool:
        if state not in self._solvable:
            self._solvable[state] = _can_reach(state, self.target)
        return self._solvable[state]

    def has_dead_end(self, state: tuple[int, ...]) -> bool:
        """Whether exploring ``state`` can show a failed leaf (so it never starts with a bare ``back``)."""
        if len(state) == 2:
            return not self.solvable(state)
        if state not in self._dead:
            self._dead[state] = any(self.has_dead_end(m[4]) for m in _moves(state))
        return self._dead[state]

    def leaf(self, state: tuple[int, ...]) -> list[tuple] | None:
        b, a = state
        results = _combine(a, b)
        self.rng.shuffle(results)
        shown = []
        for op, c in results:
            shown.append(f"{a}{op}{b}={c}")
            if c == self.target:
                self.emit(" ".join(shown) + " yes")
                return [(a, op, b, c, (c,))]
        self.emit(" ".join(shown) + " no")
        self.dead_ends += 1
        if self.chars >= self.budget or (self.max_dead_ends is not None and self.dead_ends >= self.max_dead_ends):
            self.exploring = False
        return None

    def explore(self, state: tuple[int, ...], is_root: bool) -> list[tuple] | None:
        if len(state) == 2:
            return self.leaf(state)
        moves = _moves(state)
        self.rng.shuffle(moves)
        good = [m for m in moves if self.solvable(m[4])]
        reserve = self.rng.choice(good) if is_root and good else None
        printed, tried = False, 0
        cap = None if is_root else self.rng.randint(1, 3)
        if self.exploring:
            for move in moves:
                if not self.exploring or (cap is not None and tried >= cap):
                    break
                if move is reserve or not self.has_dead_end(move[4]):
                    continue
                path = self._enter(state, move, printed)
                printed, tried = True, tried + 1
                if path is not None:
                    return path
            if self.exploring and not is_root:
                return None  # gave up on this branch
            self.exploring = False  # the root ran out of moves to explore: walk to the solution
        if not good:
            return None
        path = self._enter(state, reserve or self.rng.choice(good), printed)
        assert path is not None, "steering into a solvable state must succeed"
        return path

    def _enter(self, state: tuple[int, ...], move: tuple, printed: bool) -> list[tuple] | None:
        if printed:
            self.emit("back " + " ".join(map(str, state)))
        a, op, b, c, child = move
        self.emit(f"{a}{op}{b}={c} left " + " ".join(map(str, child)))
        path = self.explore(child, is_root=False)
        return None if path is None else [move, *path]


def search_trace(nums: Sequence[int], target: int, rng: random.Random, *,
                 explore_chars: tuple[int, int] = (450, 1250), max_dead_ends: int | None = None) -> str:
    """A searching chain of thought that ends in a verifying ``<answer>`` (format: module docstring).

    Parameters
    ----------
    nums : sequence of int
        At least two numbers; the instance must be solvable with integer intermediates.
    target : int
    rng : random.Random
        Drives the move order, the give-up points and the exploration budget.
    explore_chars : (int, int)
        The exploration phase stops after the first dead end that brings the trace past a budget
        drawn uniformly from this range; the path to the solution follows (~50-250 characters).
    max_dead_ends : int or None
        Also stop exploring after this many dead ends; ``0`` gives a direct path to a solution.

    Returns
    -------
    str
        The completion text after a prompt ending in ``<think>``: starts with ``"\\n"``, ends with
        ``"</think>\\n<answer>EXPR</answer>"``.
    """
    nums = [int(x) for x in nums]
    target = int(target)
    if len(nums) < 2:
        raise ValueError("search_trace needs at least two numbers")
    root = tuple(sorted(nums))
    writer = _TraceWriter(target, rng, rng.randint(*explore_chars), max_dead_ends)
    if not writer.solvable(root):
        raise ValueError(f"unsolvable instance: {nums} -> {target}")
    writer.emit(f"start {' '.join(map(str, root))} to {target}")
    path = writer.explore(root, is_root=True)
    writer.emit("found " + " ".join(f"{a}{op}{b}={c}" for a, op, b, c, _ in path))
    writer.emit("</think>")
    writer.emit(f"<answer>{_expression(nums, path)}</answer>")
    return "\n" + "\n".join(writer.lines)


# ----------------------------------------------------------------------------- prompts
def build_prompt(nums: Sequence[int], target: int, *, eviction_rate_tag: str | None = None,
                 prefill: bool = False, system_prompt: str | None = None) -> list[dict]:
    """TinyZero's Countdown prompt as chat messages.

    Parameters
    ----------
    nums, target
        The instance.
    eviction_rate_tag : str, optional
        E.g. ``"<eviction_rate>50%</eviction_rate>"``, appended to the user message.
    prefill : bool
        Append an assistant message ``PREFILL`` (TRL then continues the final message instead of
        adding a generation prompt). Use for Qwen-Instruct; not for R1-Distill templates.
    system_prompt : str, optional
        A system message (TinyZero used one; none by default).
    """
    numbers = "[" + ", ".join(str(int(x)) for x in nums) + "]"
    content = (f"Using the numbers {numbers}, create an equation that equals {int(target)}. You can use basic "
               "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
               "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
               "<answer> (1 + 2) / 3 </answer>.")
    if eviction_rate_tag:
        content += " " + eviction_rate_tag
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    if prefill:
        messages.append({"role": "assistant", "content": PREFILL})
    return messages


def build_plain_prompt(nums: Sequence[int], target: int, eviction_rate_tag: str | None = None) -> str:
    """Compact prompt for tokenizers without a chat template, e.g. ``"nums 3 5 7 8 target 24\\n<think>"``.

    The tag, if given, follows the target on the first line. The completion (:func:`search_trace`)
    starts with a newline.
    """
    line = "nums " + " ".join(str(int(x)) for x in nums) + f" target {int(target)}"
    if eviction_rate_tag:
        line += " " + eviction_rate_tag
    return line + "\n<think>"


def format_prompt(nums: Sequence[int], target: int, tokenizer: Any = None, *,
                  eviction_rate_tag: str | None = None, prefill: bool = True) -> str:
    """The prompt string fed to the model.

    With a tokenizer that has a chat template: the template applied to :func:`build_prompt` with
    ``add_generation_prompt=True``, followed by ``PREFILL`` when ``prefill``. Otherwise
    :func:`build_plain_prompt` (which always ends in ``<think>``).
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(build_prompt(nums, target, eviction_rate_tag=eviction_rate_tag),
                                             tokenize=False, add_generation_prompt=True)
        return text + (PREFILL if prefill else "")
    return build_plain_prompt(nums, target, eviction_rate_tag=eviction_rate_tag)


# ----------------------------------------------------------------------------- parser, verifier, reward
def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, stripped; ``None`` if absent or over 200 characters.

    Linear-time ``str.rfind`` scans only (no regex), safe on completions of any length.
    """
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", max(0, end - MAX_ANSWER_CHARS - len("<answer>")), end)
    if start < 0:
        return None
    return text[start + len("<answer>"):end].strip()


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


def verify(expression: str, nums: Sequence[int], target: int) -> bool:
    """Whether ``expression`` uses each of ``nums`` exactly once and equals ``target`` exactly.

    Never executes the input and never raises on it (see the module docstring for the grammar).
    """
    if not isinstance(expression, str) or len(expression) > MAX_ANSWER_CHARS:
        return False
    expr = " ".join(expression.translate(_UNICODE_OPS).split())
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
    if Counter(literals) != Counter(int(x) for x in nums):
        return False
    try:
        return _evaluate(tree.body) == int(target)
    except (_Reject, ZeroDivisionError, RecursionError):
        return False


def score(completion: str, nums: Sequence[int], target: int, format_reward: float = 0.0) -> float:
    """1.0 if the last answer verifies, ``format_reward`` if an answer is present but wrong, else 0.0.

    TinyZero uses ``format_reward=0.1``; the NGC paper reports plain accuracy (the default).
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return 1.0 if verify(answer, nums, target) else float(format_reward)


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a chat list whose last message's content is used."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else ""
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    return ""


def countdown_reward(prompts, completions, nums, target, format_reward: float = 0.0, **kwargs) -> list[float]:
    """TRL reward function: :func:`score` of each completion (string or chat list)."""
    return [score(completion_text(c), n, t, format_reward) for c, n, t in zip(completions, nums, target)]


reward_func = countdown_reward


# ----------------------------------------------------------------------------- datasets
def load_countdown(source: str = "generated", n: int | None = None, seed: int = 0, split: str = "train", *,
                   prompt_format: str = "chat", prefill: bool = True, eviction_rate_tag: str | None = None,
                   **ranges: Any):
    """Countdown as a ``datasets.Dataset`` with columns ``prompt``, ``nums``, ``target``.

    Parameters
    ----------
    source : str
        ``"generated"`` (:func:`generate_problems`, hash-disjoint train/test), a Hub dataset name
        (e.g. ``HUB_NAME``) or a local ``.jsonl``/``.json``/``.parquet`` file with ``nums``, ``target``.
    n : int, optional
        Number of rows (the first ``n`` of the split). Default: the whole split for Hub/local
        sources; 10,000 (train) or 1,024 (test) generated instances.
    seed : int
        Generator seed (``"generated"`` only).
    split : {"train", "test", "all"}
        Hub/local rows: TinyZero's [0, 327680) / the next 1,024 / every row.
    prompt_format : {"chat", "plain"}
        ``prompt`` as :func:`build_prompt` messages or a :func:`build_plain_prompt` string.
    prefill, eviction_rate_tag
        Passed to the prompt builders.
    **ranges
        ``count_range``, ``num_range``, ``target_range`` for the generator.
    """
    import datasets

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if prompt_format not in ("chat", "plain"):
        raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
    if source == "generated":
        if split == "all":
            raise ValueError("generated data has no 'all' split: use 'train' or 'test'")
        n = n if n is not None else (10_000 if split == "train" else TEST_ROWS)
        rows = generate_problems(n, seed + (0 if split == "train" else 1), split=split, **ranges)
    else:
        ext = os.path.splitext(source)[1].lower()
        if os.path.exists(source):
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext)
            if builder is None:
                raise ValueError(f"unsupported file type {ext!r}: use .jsonl, .json or .parquet")
            ds = datasets.load_dataset(builder, data_files=source, split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
        lo, hi = {"train": (0, TRAIN_ROWS), "test": (TRAIN_ROWS, TRAIN_ROWS + TEST_ROWS),
                  "all": (0, len(ds))}[split]
        hi = min(hi, len(ds), lo + n if n is not None else hi)
        ds = ds.select(range(lo, hi) if lo < hi else [])
        rows = [{"nums": a, "target": t} for a, t in zip(ds["nums"], ds["target"])]
    nums_col = [[int(x) for x in row["nums"]] for row in rows]
    target_col = [int(row["target"]) for row in rows]
    if prompt_format == "plain":
        prompts = [build_plain_prompt(a, t, eviction_rate_tag) for a, t in zip(nums_col, target_col)]
    else:
        prompts = [build_prompt(a, t, eviction_rate_tag=eviction_rate_tag, prefill=prefill)
                   for a, t in zip(nums_col, target_col)]
    return datasets.Dataset.from_dict({"prompt": prompts, "nums": nums_col, "target": target_col})
