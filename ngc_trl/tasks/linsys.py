"""LinSys: systems of linear equations with a unique integer solution, in one module.

Generator, solution traces and the task class :class:`LinSys` (:data:`TASK`: prompts, parser and
verifier) live together; the RL reward (``TASK.reward_func``, logged as ``linsys_reward``) and evaluation
both call ``TASK.score``, so they cannot disagree. Breadcrumbs
Reasoning (arXiv 2510.13797) used this task but did not publish its generator; this one is ours.

Instances
---------
* ``n`` variables, ``n`` drawn from ``num_vars`` (default 2-3, at most 6), named ``x y z w u v`` in
  that order (:data:`VAR_NAMES`).
* The solution is drawn uniformly from ``solution_range`` (default [-9, 9]) per variable; the ``n x n``
  coefficient matrix uniformly from ``coef_range`` (default [-9, 9], zeros allowed), redrawn until it
  is nonsingular (determinant by exact :class:`fractions.Fraction` elimination), so the integer
  solution is the only solution. Right-hand sides are computed: ``|rhs| <= n * 81`` by default.
* Instance dicts: ``{"coeffs": [[int]*n]*n, "rhs": [int]*n, "solution": [int]*n}`` (plain lists,
  Arrow/JSON friendly). Equation ``i`` is ``sum_j coeffs[i][j] * VAR_NAMES[j] = rhs[i]``.
* Train/test: an instance is ``"test"`` when a stable hash of its equations (as a set, so permuting
  equations does not move it) falls in bucket 0 of 16; splits are disjoint whatever the seeds.

Answer format and verifier
--------------------------
The answer is the content of the **last** ``<answer>...</answer>`` (at most 200 characters), e.g.
``<answer>x=1, y=-2</answer>``: ``name=integer`` pairs separated by ``,`` ``;`` or newlines, spaces
allowed around ``=`` and separators, ``−`` (U+2212) read as ``-``. Parsing is a regex on each piece
(ASCII digits only, at most 12 digits, names ``[A-Za-z][A-Za-z0-9_]{0,7}``); nothing is evaluated. The
verifier requires every variable exactly once (no missing, extra or repeated names) and checks the
values by substituting them into **every equation** with integer arithmetic. For a generated
(nonsingular) system this is equivalent to equality with the unique solution; for a singular system
any exact solution would pass.

Solution-trace format (SFT data for tiny models)
------------------------------------------------
:func:`solution_trace` writes fraction-free Gaussian elimination: each new equation is an integer
combination of two earlier ones, divided by the gcd of its coefficients when that is above 1, so
every printed number is an integer; then back substitution::

    e1: LHS=RHS                  the given equations, compact form
    eliminate V with eK          pivot variable V, pivot equation eK
    eM = aeI-beK: LHS=RHS        new equation (a, b > 0 coprime; 1 omitted; "+" when b < 0)
    eM = (aeI-beK)/g: LHS=RHS    ... divided by the gcd g > 1
    V: eK with U=1 gives 3V=6 so V=2     back substitution (known values listed)
    </think>
    <answer>x=.., y=..</answer>

Example (``solution_trace({"coeffs": [[2, 3], [1, -1]], "rhs": [7, 1]}, random.Random(0))``)::

    e1: 2x+3y=7
    e2: x-y=1
    eliminate x with e2
    e3 = (e1-2e2)/5: y=1
    y: e3 gives y=1
    x: e2 with y=1 gives x=2
    </think>
    <answer>x=2, y=1</answer>

The elimination order of the variables and the pivot equations are drawn from ``rng`` (natural order
and the first usable equation when ``rng`` is ``None``). Traces of the default instances measure
~100-330 characters.

``show_work=True`` (the tiny LinSys testbed) also writes the arithmetic as two-operand steps: a line
``2e2-e1 y: 2*-1=-2, 1*3=3, -2-3=-5; rhs: 2*1=2, 1*7=7, 2-7=-5`` before each new equation, and the
products and running differences in each back substitution (``x: e1 with y=1: 3*1=3, 7-3=4 gives 2x=4
so x=2``), so that no token needs more than one fact; ~170 tokens for ``DISTRIBUTIONS["testbed"]``.

Prompts
-------
* ``TASK.build_prompt(row)``: chat messages in the wording of the Countdown prompt (``<think>`` tags,
  ``<answer>`` tags with an example), equations one per line as ``2x + 3y - z = 7``.
* ``TASK.build_plain_prompt(row)``: ``"solve 2x+3y=7; x-y=1\\n<think>"`` for tiny models without a chat
  template; ``build_plain_prompt(row) + solution_trace(row)`` is one SFT example.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from math import gcd
from typing import Any

from ngc_trl.tasks.base import GeneratedTask

VAR_NAMES = ("x", "y", "z", "w", "u", "v")
MAX_ANSWER_CHARS = 200
MAX_DIGITS = 12
TEST_BUCKETS = 16  # generated instances whose hash % 16 == 0 form the test split

# named generator settings: ``TASK.load("generated:<name>")``
DISTRIBUTIONS: dict[str, dict[str, Any]] = {
    "standard": dict(num_vars=(2, 3), coef_range=(-9, 9), solution_range=(-9, 9)),
    # the offline tiny testbed (ngc_trl.testbed --task linsys): 2x2 systems whose written-out elimination
    # (solution_trace(show_work=True)) is ~170 tokens with numbers up to ~160
    "testbed": dict(num_vars=(2, 2), coef_range=(-4, 4), solution_range=(-5, 5)),
}

_PAIR = re.compile(rf"([A-Za-z][A-Za-z0-9_]{{0,7}})[ \t]*=[ \t]*([+-]?)[ \t]*([0-9]{{1,{MAX_DIGITS}}})")
_SEPARATORS = re.compile(r"[,;\n]")


# ----------------------------------------------------------------------------- formatting
def variable_names(n: int) -> list[str]:
    """The first ``n`` names of :data:`VAR_NAMES`; ``ValueError`` outside ``1..6``."""
    if not 1 <= n <= len(VAR_NAMES):
        raise ValueError(f"LinSys supports 1 to {len(VAR_NAMES)} variables, got {n}")
    return list(VAR_NAMES[:n])


def format_equation(row: Sequence[int], rhs: int, *, spaced: bool = True) -> str:
    """One equation as text: ``2x + 3y - z = 7`` (``spaced``) or ``2x+3y-z=7``.

    Zero coefficients are omitted and a coefficient of +-1 is written as the sign only; an equation
    with no nonzero coefficient is written ``0 = rhs``.
    """
    names = variable_names(len(row))
    plus, minus, eq = (" + ", " - ", " = ") if spaced else ("+", "-", "=")
    out = ""
    for c, name in zip(row, names):
        c = int(c)
        if c == 0:
            continue
        term = name if abs(c) == 1 else f"{abs(c)}{name}"
        if not out:
            out = ("-" if c < 0 else "") + term
        else:
            out += (minus if c < 0 else plus) + term
    return (out or "0") + eq + str(int(rhs))


# ----------------------------------------------------------------------------- exact linear algebra
def determinant(coeffs: Sequence[Sequence[int]]) -> Fraction:
    """Determinant of a square matrix by Gaussian elimination in exact :class:`Fraction` arithmetic."""
    m = [[Fraction(int(x)) for x in row] for row in coeffs]
    n = len(m)
    if any(len(row) != n for row in m):
        raise ValueError("determinant needs a square matrix")
    det = Fraction(1)
    for col in range(n):
        pivot = next((r for r in range(col, n) if m[r][col] != 0), None)
        if pivot is None:
            return Fraction(0)
        if pivot != col:
            m[col], m[pivot] = m[pivot], m[col]
            det = -det
        det *= m[col][col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return det


def solve(coeffs: Sequence[Sequence[int]], rhs: Sequence[int]) -> list[Fraction] | None:
    """The unique solution (exact Fractions) of ``coeffs @ v = rhs``; ``None`` if the matrix is singular."""
    n = len(coeffs)
    m = [[Fraction(int(x)) for x in row] + [Fraction(int(b))] for row, b in zip(coeffs, rhs)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if m[r][col] != 0), None)
        if pivot is None:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col and m[r][col]:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


# ----------------------------------------------------------------------------- generator
def _split_of(coeffs: Sequence[Sequence[int]], rhs: Sequence[int]) -> str:
    """``"test"`` for 1/16 of all instances (stable hash of the sorted equations), else ``"train"``."""
    key = repr(sorted([*map(int, row), int(b)] for row, b in zip(coeffs, rhs))).encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def generate_problems(
    n: int,
    seed: int,
    *,
    split: str | None = None,
    num_vars: tuple[int, int] = (2, 3),
    coef_range: tuple[int, int] = (-9, 9),
    solution_range: tuple[int, int] = (-9, 9),
    max_draws: int = 100_000,
) -> list[dict]:
    """Generate ``n`` systems with a unique integer solution, deterministically for a seed.

    Per instance: draw the variable count from ``num_vars``, then the solution and the coefficient
    matrix until the matrix is nonsingular (and, with ``split``, the instance is in that split). All
    ranges are inclusive. Instance ``i`` depends only on the seed (a shorter run is a prefix).

    Parameters
    ----------
    n, seed : int
    split : {"train", "test"} or None
        Keep only instances of that hash split (disjoint whatever the seeds); ``None`` keeps all.
    num_vars, coef_range, solution_range : (int, int)
    max_draws : int
        Draws allowed for one instance before ``RuntimeError`` (e.g. an all-zero ``coef_range``).

    Returns
    -------
    list of dict
        ``{"coeffs": list[list[int]], "rhs": list[int], "solution": list[int]}``.
    """
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    variable_names(num_vars[0])
    variable_names(num_vars[1])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(*num_vars)
        for _ in range(max_draws):
            solution = [rng.randint(*solution_range) for _ in range(k)]
            coeffs = [[rng.randint(*coef_range) for _ in range(k)] for _ in range(k)]
            rhs = [sum(a * v for a, v in zip(row, solution)) for row in coeffs]
            if split is not None and _split_of(coeffs, rhs) != split:
                continue
            if determinant(coeffs) != 0:
                out.append({"coeffs": coeffs, "rhs": rhs, "solution": solution})
                break
        else:
            raise RuntimeError(f"no nonsingular system in {max_draws} draws ({k} variables, {coef_range})")
    return out


# ----------------------------------------------------------------------------- solution traces
def _combination(a: int, i: int, b: int, k: int) -> str:
    """Text of ``a*e_i - b*e_k`` with coefficient 1 omitted, e.g. ``2e1-e3`` or ``e2+3e1``."""
    first = f"e{i}" if a == 1 else f"{a}e{i}"
    second = f"e{k}" if abs(b) == 1 else f"{abs(b)}e{k}"
    return first + ("-" if b > 0 else "+") + second


def _product_and_sum(pairs: Sequence[tuple[int, int]], start: int | None = None) -> tuple[list[str], int]:
    """Binary arithmetic steps of ``start - sum(a * b)`` (or of ``p_1 - p_2`` for two pairs without ``start``).

    Each product is one step ``a*b=p`` and each subtraction one step ``r-p=r'`` (``r+|p|=r'`` when ``p < 0``),
    so every step is a two-operand lookup, as in a Countdown search trace.
    """
    steps, products = [], []
    for a, b in pairs:
        products.append(a * b)
        steps.append(f"{a}*{b}={a * b}")
    acc = products.pop(0) if start is None else start
    for q in products:
        new = acc - q
        steps.append(f"{acc}-{q}={new}" if q >= 0 else f"{acc}+{-q}={new}")
        acc = new
    return steps, acc


def solution_trace(
    problem: Mapping[str, Any], rng: random.Random | None = None, *, show_work: bool = False
) -> str:
    """Fraction-free elimination and back substitution ending in a verifying answer (module docstring).

    Parameters
    ----------
    problem : mapping
        ``coeffs`` and ``rhs``; the system must have a unique integer solution.
    rng : random.Random, optional
        Draws the elimination order of the variables and the pivot equations.
    show_work : bool
        Write the arithmetic of every new coefficient and every back substitution as two-operand steps
        (:func:`_product_and_sum`) before its result, e.g. ``2e2-e1 y: 2*-1=-2, 1*3=3, -2-3=-5; rhs: ...``
        on the line before ``e3 = ...``, and ``x: e1 with y=1: 3*1=3, 7-3=4 gives 2x=4 so x=2``.
        Longer traces a small model can learn (the tiny LinSys testbed); the default is the compact form.

    Returns
    -------
    str
        The completion after a prompt ending in ``<think>``: starts with ``"\\n"``, ends with
        ``"</think>\\n<answer>x=.., y=..</answer>"``. ``ValueError`` for a singular system or a
        non-integer solution.
    """
    coeffs = [[int(x) for x in row] for row in problem["coeffs"]]
    rhs = [int(b) for b in problem["rhs"]]
    n = len(coeffs)
    names = variable_names(n)
    if any(len(row) != n for row in coeffs) or len(rhs) != n:
        raise ValueError("solution_trace needs n equations in n variables")
    rows = {i + 1: (coeffs[i], rhs[i]) for i in range(n)}  # label -> (coefficients, rhs)
    lines = [f"e{i}: {format_equation(c, b, spaced=False)}" for i, (c, b) in rows.items()]
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    active, pivots = list(rows), []
    for var in order:
        candidates = [lab for lab in active if rows[lab][0][var] != 0]
        if not candidates:
            raise ValueError("singular system: no unique solution")
        pivot = rng.choice(candidates) if rng is not None else candidates[0]
        active.remove(pivot)
        pivots.append((var, pivot))
        if any(rows[lab][0][var] for lab in active):
            lines.append(f"eliminate {names[var]} with e{pivot}")
        pc, pb = rows[pivot]
        kept = []
        for lab in active:
            c, b = rows[lab]
            q = c[var]
            if q == 0:
                kept.append(lab)
                continue
            m = gcd(pc[var], q)
            a, f = pc[var] // m, q // m
            if a < 0:
                a, f = -a, -f
            new = [a * x - f * y for x, y in zip(c, pc)]
            new_b = a * b - f * pb
            g = gcd(*new, new_b)
            if g > 1:
                new, new_b = [x // g for x in new], new_b // g
            label = len(rows) + 1
            rows[label] = (new, new_b)
            combo = _combination(a, lab, f, pivot)
            if show_work:
                work = [
                    f"{names[j]}: " + ", ".join(_product_and_sum([(a, c[j]), (f, pc[j])])[0])
                    for j in range(n)
                    if j != var and (c[j] or pc[j])
                ]
                work.append("rhs: " + ", ".join(_product_and_sum([(a, b), (f, pb)])[0]))
                lines.append(f"{combo} " + "; ".join(work))
            lhs = f"({combo})/{g}" if g > 1 else combo
            lines.append(f"e{label} = {lhs}: {format_equation(new, new_b, spaced=False)}")
            kept.append(label)
        active = kept
    values: dict[int, int] = {}
    for var, lab in reversed(pivots):
        c, b = rows[lab]
        known = [j for j in range(n) if j != var and c[j] != 0]
        rest = b - sum(c[j] * values[j] for j in known)
        value = Fraction(rest, c[var])
        if value.denominator != 1:
            raise ValueError("the system's solution is not an integer vector")
        values[var] = int(value)
        line = f"{names[var]}: e{lab}"
        if known:
            line += " with " + ", ".join(f"{names[j]}={values[j]}" for j in sorted(known))
            if show_work:
                line += ": " + ", ".join(
                    _product_and_sum([(c[j], values[j]) for j in sorted(known)], start=b)[0]
                )
        term = format_equation([c[var] if j == var else 0 for j in range(n)], rest, spaced=False)
        line += f" gives {term}" + ("" if c[var] == 1 else f" so {names[var]}={values[var]}")
        lines.append(line)
    answer = ", ".join(f"{names[j]}={values[j]}" for j in range(n))
    return "\n" + "\n".join(lines) + f"\n</think>\n<answer>{answer}</answer>"


# ----------------------------------------------------------------------------- the task
class LinSys(GeneratedTask):
    """LinSys (module docstring): rows ``{"coeffs": [[int]*n]*n, "rhs": [int]*n}``; answers are
    ``name=integer`` assignments in ``<answer>`` tags, substituted into every equation."""

    name = "linsys"
    columns = ("coeffs", "rhs")
    distributions = DISTRIBUTIONS
    max_answer_chars = MAX_ANSWER_CHARS

    def generate(self, n: int, seed: int, *, split: str | None = None, **ranges: Any) -> list[dict]:
        """:func:`generate_problems` (rows also carry the ``solution``)."""
        return generate_problems(n, seed, split=split, **ranges)

    def instance_key(self, row: Mapping[str, Any]) -> tuple:
        """The equations as a sorted tuple (the order of the equations does not change the system)."""
        return tuple(sorted((*map(int, a), int(b)) for a, b in zip(row["coeffs"], row["rhs"])))

    def prompt_content(self, row: Mapping[str, Any]) -> str:
        """The user message, in the wording of the Countdown prompt: equations one per line as
        ``2x + 3y - z = 7``, ``<think>`` tags, ``<answer>`` tags with an example."""
        coeffs, rhs = row["coeffs"], row["rhs"]
        names = variable_names(len(coeffs))
        equations = "\n".join(format_equation(eq, b) for eq, b in zip(coeffs, rhs))
        return (
            f"Solve the following system of linear equations for {', '.join(names)}. The solution is "
            f"unique and every value is an integer.\n{equations}\nShow your work in <think> </think> "
            "tags. And return the final answer in <answer> </answer> tags, giving every variable as "
            "name=value separated by commas, for example <answer>x=1, y=-2</answer>."
        )

    def plain_line(self, row: Mapping[str, Any]) -> str:
        """``"solve 2x+3y=7; x-y=1"`` (the plain prompt adds ``"\\n<think>"``; :func:`solution_trace`
        continues it)."""
        return "solve " + "; ".join(
            format_equation(eq, b, spaced=False) for eq, b in zip(row["coeffs"], row["rhs"])
        )

    def parse_assignment(self, answer: str) -> dict[str, int] | None:
        """``"x=1, y=-2"`` -> ``{"x": 1, "y": -2}``; ``None`` on any malformed piece or a repeated name.

        Pieces are split on ``,`` ``;`` and newlines and each must match ``name = [+-]digits`` entirely
        (ASCII digits, at most 12). At most 200 characters; nothing is evaluated.
        """
        if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
            return None
        out: dict[str, int] = {}
        for piece in _SEPARATORS.split(answer.replace("\u2212", "-")):
            m = _PAIR.fullmatch(piece.strip(" \t\r"))
            if m is None or m.group(1) in out:
                return None
            out[m.group(1)] = int(m.group(2) + m.group(3))
        return out

    def verify(self, answer: str, row: Mapping[str, Any]) -> bool:
        """Whether ``answer`` (the content of the answer tags) gives every variable once and solves the
        system ``row`` (``coeffs``, ``rhs``): the values are substituted into every equation (exact
        integers). Never evaluates the input and never raises on it."""
        values = self.parse_assignment(answer)
        if values is None:
            return False
        coeffs, rhs = row["coeffs"], row["rhs"]
        names = variable_names(len(coeffs))
        if sorted(values) != sorted(names):
            return False
        vector = [values[name] for name in names]
        return all(sum(int(a) * v for a, v in zip(eq, vector)) == int(b) for eq, b in zip(coeffs, rhs))


TASK = LinSys()
