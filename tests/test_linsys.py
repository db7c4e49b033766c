"""LinSys task: generator (unique integer solutions, splits), parser/verifier, hostile fuzz, traces, rewards."""

import builtins
import random
import re
import time
from fractions import Fraction

import pytest

from ngc_trl.tasks import TASKS, get_task, linsys
from ngc_trl.tasks.base import PREFILL
from ngc_trl.tasks.linsys import TASK, determinant, format_equation, generate_problems, solution_trace, solve

# 2x + 3y = 7, x - y = 1  ->  x = 2, y = 1
P2 = {"coeffs": [[2, 3], [1, -1]], "rhs": [7, 1]}
# x + y + z = 6, 2y - z = 1, x - z = -2  ->  x = 1, y = 2, z = 3
P3 = {"coeffs": [[1, 1, 1], [0, 2, -1], [1, 0, -1]], "rhs": [6, 1, -2]}


# ----------------------------------------------------------------------------- registry
def test_registered():
    assert TASKS["linsys"] is TASK and get_task("linsys") is TASK and isinstance(TASK, linsys.LinSys)
    assert TASK.reward_func is TASK.reward_func and TASK.reward_func.__name__ == "linsys_reward"


# ----------------------------------------------------------------------------- exact algebra
def test_determinant_and_solve():
    assert determinant([[2, 3], [1, -1]]) == -5
    assert determinant([[1, 2], [2, 4]]) == 0
    assert determinant([[0, 1], [1, 0]]) == -1  # needs a row swap
    assert determinant([[2, 0, 0], [0, 3, 0], [0, 0, 4]]) == 24
    assert solve(P3["coeffs"], P3["rhs"]) == [1, 2, 3]
    assert solve([[1, 2], [2, 4]], [1, 2]) is None
    assert solve([[2, 0], [0, 2]], [1, 2]) == [Fraction(1, 2), 1]


# ----------------------------------------------------------------------------- generator
def test_generator_unique_integer_solution_deterministic_in_range():
    problems = generate_problems(400, seed=7)
    assert problems == generate_problems(400, seed=7)
    assert generate_problems(50, seed=7) == problems[:50]  # instance i depends only on the seed
    assert problems[:50] != generate_problems(50, seed=8)
    sizes = {2: 0, 3: 0}
    for p in problems:
        n = len(p["coeffs"])
        sizes[n] += 1
        assert all(len(row) == n for row in p["coeffs"]) and len(p["rhs"]) == len(p["solution"]) == n
        assert all(-9 <= a <= 9 for row in p["coeffs"] for a in row)
        assert all(-9 <= v <= 9 for v in p["solution"])
        assert determinant(p["coeffs"]) != 0  # unique solution ...
        assert solve(p["coeffs"], p["rhs"]) == p["solution"]  # ... and it is the stored integer one
        assert all(type(x) is int for x in p["rhs"] + p["solution"])
    assert min(sizes.values()) > 150  # about half 2-variable, half 3-variable


def test_generator_ranges_and_errors():
    problems = generate_problems(30, seed=0, num_vars=(4, 4), coef_range=(1, 3), solution_range=(50, 60))
    for p in problems:
        assert len(p["coeffs"]) == 4 and all(1 <= a <= 3 for row in p["coeffs"] for a in row)
        assert all(50 <= v <= 60 for v in p["solution"]) and determinant(p["coeffs"]) != 0
    with pytest.raises(RuntimeError):
        generate_problems(1, seed=0, coef_range=(0, 0), max_draws=20)
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, num_vars=(2, 7))
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, split="validation")


def test_generated_splits_are_disjoint():
    key = lambda p: (tuple(map(tuple, p["coeffs"])), tuple(p["rhs"]))  # noqa: E731
    train = generate_problems(1500, seed=0, split="train")
    test = generate_problems(150, seed=0, split="test")
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert all(linsys._split_of(p["coeffs"], p["rhs"]) == "test" for p in test)
    # the split ignores the order of the equations
    p = test[0]
    assert linsys._split_of(p["coeffs"][::-1], p["rhs"][::-1]) == "test"
    unfiltered = generate_problems(800, seed=5)
    share = sum(linsys._split_of(p["coeffs"], p["rhs"]) == "test" for p in unfiltered) / len(unfiltered)
    assert 0.02 < share < 0.12  # ~1/16


# ----------------------------------------------------------------------------- parser and verifier
@pytest.mark.parametrize(
    "answer, problem",
    [
        ("x=2, y=1", P2),
        ("y = 1 ; x = 2", P2),  # any order, ; separator, spaces
        ("x=2\ny=1", P2),
        ("x=+2, y=1", P2),
        ("x=002, y=1", P2),
        ("x=1, y=2, z=3", P3),
        ("z=3,x=1,y=2", P3),
        ("x=-7, y=3", {"coeffs": [[1, 1], [1, -1]], "rhs": [-4, -10]}),
        ("x=\u22127, y=3", {"coeffs": [[1, 1], [1, -1]], "rhs": [-4, -10]}),  # unicode minus
    ],
)
def test_verify_accepts(answer, problem):
    assert TASK.verify(answer, problem)


@pytest.mark.parametrize(
    "answer, problem",
    [
        ("x=2, y=2", P2),  # wrong value
        ("x=1, y=2", P2),  # swapped values
        ("x=2", P2),  # missing variable
        ("x=2, y=1, y=1", P2),  # duplicated variable
        ("x=2, x=2, y=1", P2),
        ("x=2, y=1, z=0", P2),  # extra variable
        ("x=2, Y=1", P2),  # names are case-sensitive
        ("x=2, y=1,", P2),  # empty piece
        ("x=2 y=1", P2),  # no separator
        ("x=2.0, y=1", P2),  # decimals
        ("x=4/2, y=1", P2),  # expressions are not evaluated
        ("x=1+1, y=1", P2),
        ("x=２, y=1", P2),  # full-width digit
        ("x=١, y=2, z=3", P3),  # Arabic-Indic digit
        ("(x, y) = (2, 1)", P2),
        ("x=2, y=1 and z=3", P3),
        ("", P2),
        ("x=" + "0" * 13 + "2, y=1", P2),  # over 12 digits
        ("x=2, y=1" + " " * 200, P2),  # over 200 characters
        ("x=1, y=2, z=4", P3),
    ],
)
def test_verify_rejects(answer, problem):
    assert not TASK.verify(answer, problem)


def test_verify_substitutes_into_every_equation():
    assert TASK.verify("x=1, y=2, z=3", P3)
    # satisfies the first two equations only
    assert not TASK.verify("x=0, y=3, z=3", {"coeffs": P3["coeffs"], "rhs": P3["rhs"]})
    assert not TASK.verify(None, P2) and not TASK.verify(b"x=2, y=1", P2)


def test_parse_and_extract():
    assert TASK.parse_assignment("x = -3, yy_2=+4") == {"x": -3, "yy_2": 4}
    assert TASK.parse_assignment("x=1, x=1") is None
    assert TASK.parse_assignment("1=x") is None
    assert TASK.extract_answer("<answer>x=1</answer> then <answer> x=2, y=1 </answer>") == "x=2, y=1"
    assert TASK.extract_answer("<answer>x=1") is None and TASK.extract_answer("no tags") is None
    assert TASK.extract_answer("<answer><answer>x=2, y=1</answer>") == "x=2, y=1"  # nested: the innermost
    assert TASK.extract_answer("<answer>" + "x=1, " * 50 + "</answer>") is None  # over 200 characters
    t0 = time.perf_counter()
    assert TASK.extract_answer("x" * 200_000 + "<answer>x=2, y=1</answer>" + "</answer>" * 10_000) is None
    assert time.perf_counter() - t0 < 0.1


def _hostile_strings(rng: random.Random, count: int) -> list[str]:
    fixed = [
        "__import__('builtins').__dict__.__setitem__('NGC_PWNED', 1)",
        "x=__import__('os').system('touch ngc_pwned'), y=1",
        "open('ngc_pwned', 'w')",
        "x=9**9**9, y=1",
        "x=10**100000",
        "x=" + "9" * 100_000 + ", y=1",
        "x=" + "9" * 199,
        "9" * 100_000,
        "x" * 100_000,
        "(" * 10_000 + "x=1" + ")" * 10_000,
        "[" * 5000 + "]" * 5000,
        ",".join(["x=1"] * 30_000),
        "x=1, " * 40,
        "x=" + "-" * 150 + "1",
        "x=１, y=２",
        "x=١, y=٢",
        "x=𝟏, y=𝟐",  # mathematical bold digits
        "x=1\x00, y=1",
        "\ufeffx=2, y=1",
        "x=2\u200b, y=1",
        "<answer>" * 1000,
        "<answer>x=1</answer>" * 1000,
        "<answer><answer><answer>x=2, y=1</answer></answer></answer>",
        "ÿ" * 5000,
        "x=1e308, y=1",
        "x=0x10, y=1",
        "x=1_000, y=1",
        "x==1, y=1",
        "=,=,=,=",
        "x=2, y=1" + "\n" * 50_000,
    ]
    alphabet = list("0123456789+-*/()=,;  \n\t.xyzwXYZ_<>^eE'\"é\x00１٢−") + [
        "**",
        "x=",
        "y=",
        "<answer>",
        "</answer>",
        "9" * 20,
    ]
    out = list(fixed)
    while len(out) < count:
        length = rng.choice([1, 3, 8, 20, 60, 199, 200, 201, 1000])
        out.append("".join(rng.choice(alphabet) for _ in range(length)))
    return out


def test_fuzz_hostile_inputs_no_exception_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(99)
    problems = generate_problems(20, seed=1) + [P2, P3]
    strings = _hostile_strings(rng, 3000)
    start, slowest = time.perf_counter(), 0.0
    for s in strings:
        t0 = time.perf_counter()
        p = rng.choice(problems)
        assert TASK.verify(s, p) in (True, False)
        assert TASK.score(f"think {s} <answer>{s}</answer> tail", p, 0.1) in (0.0, 0.1, 1.0)
        assert TASK.score(s, p) in (0.0, 1.0)
        parsed = TASK.parse_assignment(s)
        assert parsed is None or all(type(v) is int for v in parsed.values())
        assert TASK.extract_answer(s) is None or isinstance(TASK.extract_answer(s), str)
        slowest = max(slowest, time.perf_counter() - t0)
    assert time.perf_counter() - start < 5.0
    assert slowest < 0.2
    assert not hasattr(builtins, "NGC_PWNED") and not list(tmp_path.iterdir())
    # the hostile fixed strings with a right answer buried in them never verify
    assert not any(TASK.verify(s, P2) for s in strings[:20])


# ----------------------------------------------------------------------------- rewards
def test_score_and_reward():
    assert TASK.score("<think>e1</think><answer>x=2, y=1</answer>", P2) == 1.0
    assert TASK.score("<answer>x=2, y=2</answer>", P2) == 0.0
    assert TASK.score("<answer>x=2, y=2</answer>", P2, format_reward=0.1) == 0.1
    assert TASK.score("x=2, y=1", P2, format_reward=0.1) == 0.0  # no tags
    assert TASK.score("<answer>x=2, y=1</answer> no, <answer>x=0, y=0</answer>", P2) == 0.0  # the last counts
    completions = [
        [{"role": "assistant", "content": "<answer>x=2, y=1</answer>"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "<answer>x=1, y=2, z=3</answer>"}]}],
        "<answer>x=1, y=2</answer>",
        "no answer",
    ]
    coeffs = [P2["coeffs"], P3["coeffs"], P2["coeffs"], P2["coeffs"]]
    rhs = [P2["rhs"], P3["rhs"], P2["rhs"], P2["rhs"]]
    assert TASK.reward_func(prompts=[None] * 4, completions=completions, coeffs=coeffs, rhs=rhs) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    assert TASK.reward_func(
        None, completions, coeffs=coeffs, rhs=rhs, format_reward=0.1, trainer_state=None
    ) == [
        1.0,
        1.0,
        0.1,
        0.0,
    ]


# ----------------------------------------------------------------------------- traces
def test_solution_traces_verify():
    rng = random.Random(0)
    lengths = []
    for p in generate_problems(300, seed=3) + generate_problems(30, seed=4, num_vars=(4, 5)):
        trace = solution_trace(p, rng)
        assert trace.startswith("\ne1: ") and "\n</think>\n<answer>" in trace and trace.endswith("</answer>")
        assert TASK.score(trace, p) == 1.0
        names = linsys.variable_names(len(p["coeffs"]))
        assert TASK.extract_answer(trace) == ", ".join(f"{k}={v}" for k, v in zip(names, p["solution"]))
        body = trace.split("</think>")[0]
        assert all(f"\n{k}: e" in body for k in names)  # one back-substitution line per variable
        assert "/" not in body.replace(")/", "")  # integers only, except the gcd divisions
        lengths.append(len(trace))
    assert 80 <= min(lengths) and max(lengths) <= 1000


def test_show_work_steps_are_true_two_operand_facts_and_end_in_the_compact_results():
    step = re.compile(r"(-?\d+)([*+-])(-?\d+)=(-?\d+)")
    ops = {"*": lambda x, y: x * y, "+": lambda x, y: x + y, "-": lambda x, y: x - y}
    problems = generate_problems(200, seed=5) + generate_problems(
        50, seed=6, **linsys.DISTRIBUTIONS["testbed"]
    )
    for i, p in enumerate(problems):
        # natural order, or the same drawn order for both
        worked, compact = (
            solution_trace(p, None if i % 2 else random.Random(i), show_work=w) for w in (True, False)
        )
        assert TASK.score(worked, p) == 1.0
        facts = step.findall(worked)
        assert facts and all(ops[op](int(x), int(y)) == int(z) for x, op, y, z in facts)
        # the compact lines are all still there, in order; the work only adds text
        kept = [line.split(":")[0] if line[:1] in "xyzwuv" else line for line in compact.split("\n")]
        lines = iter(worked.split("\n"))
        assert all(any(w.startswith(k) for w in lines) for k in kept)
    # the back substitution's running value is the rhs minus the known terms
    assert "x: e1 with y=1: 3*1=3, 7-3=4 gives 2x=4 so x=2" in solution_trace(P2, show_work=True)


def test_solution_trace_example_determinism_and_errors():
    example = solution_trace(P2, random.Random(0))
    body = "\n".join("    " + line for line in example.strip("\n").split("\n"))
    assert body in linsys.__doc__  # the documented example is real output
    assert solution_trace(P3, random.Random(5)) == solution_trace(P3, random.Random(5))
    orders = {solution_trace(P3, random.Random(s)) for s in range(20)}
    assert len(orders) > 2  # rng changes the elimination order
    assert solution_trace(P2) == solution_trace(P2, None)
    with pytest.raises(ValueError, match="singular"):
        solution_trace({"coeffs": [[1, 2], [2, 4]], "rhs": [3, 6]})
    with pytest.raises(ValueError, match="integer"):
        solution_trace({"coeffs": [[2, 0], [0, 1]], "rhs": [1, 1]})


# ----------------------------------------------------------------------------- prompts and datasets
def test_format_equation():
    assert format_equation([2, 3, -1], 7) == "2x + 3y - z = 7"
    assert format_equation([-1, 0, 5], -4, spaced=False) == "-x+5z=-4"
    assert format_equation([0, 1], 0) == "y = 0"
    assert format_equation([0, 0], 3) == "0 = 3"


def test_prompts():
    messages = TASK.build_prompt(P3, eviction_rate_tag="<eviction_rate>50%</eviction_rate>")
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert "x + y + z = 6\n2y - z = 1\nx - z = -2\n" in content and "for x, y, z." in content
    assert "<answer>x=1, y=-2</answer>" in content and "<think>" in content
    assert content.endswith("<eviction_rate>50%</eviction_rate>")
    with_prefill = TASK.build_prompt(P2, prefill=True, system_prompt="sys")
    assert [m["role"] for m in with_prefill] == ["system", "user", "assistant"]
    assert with_prefill[-1]["content"] == PREFILL
    assert TASK.build_plain_prompt(P2) == "solve 2x+3y=7; x-y=1\n<think>"
    assert TASK.build_plain_prompt(P2, "<e>") == "solve 2x+3y=7; x-y=1 <e>\n<think>"

    class Chat:
        chat_template = "t"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + "|assistant:"

    assert TASK.format_prompt(P2, Chat()).endswith("|assistant:" + PREFILL)
    assert TASK.format_prompt(P2) == TASK.build_plain_prompt(P2)


def test_load_linsys():
    train = TASK.load("generated", 40, seed=0, split="train")
    test = TASK.load("generated", 10, seed=0, split="test", prompt_format="plain", num_vars=(3, 3))
    assert train.column_names == ["prompt", "coeffs", "rhs"] and len(train) == 40
    assert train[0]["prompt"][-1] == {"role": "assistant", "content": PREFILL}
    assert test[0]["prompt"].startswith("solve ") and len(test) == 10
    assert all(len(row["coeffs"]) == 3 for row in test)
    row = train[3]
    answer = ", ".join(f"{k}={v}" for k, v in zip("xyz", solve(row["coeffs"], row["rhs"])))
    assert TASK.reward_func(
        None, [f"<answer>{answer}</answer>"], coeffs=[row["coeffs"]], rhs=[row["rhs"]]
    ) == [1.0]
    with pytest.raises(ValueError):
        TASK.load("generated", 5, split="all")
