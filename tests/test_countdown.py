"""Countdown task: verifier (incl. TinyZero's loopholes and a hostile fuzz), generator, traces, rewards."""

import builtins
import json
import random
import re
import time

import pytest

from ngc_trl.tasks import TASKS, countdown, get_task
from ngc_trl.tasks.base import PREFILL
from ngc_trl.tasks.countdown import TASK, generate_problems, search_trace, solve


def row(nums, target):
    return {"nums": nums, "target": target}


# ----------------------------------------------------------------------------- registry
def test_registry_resolves_every_name():
    for name, task in TASKS.items():
        assert get_task(name) is task and task.name == name
        assert callable(task.reward_func) and callable(task.extract_answer)
    with pytest.raises(ValueError, match="countdown"):
        get_task("nope")


# ----------------------------------------------------------------------------- verifier
@pytest.mark.parametrize(
    "expr, nums, target",
    [
        ("(1 + 2) / 3", [1, 2, 3], 1),
        ("(8/4)*12+3", [8, 4, 12, 3], 27),  # exact division
        ("25+3*4", [25, 3, 4], 37),
        ("((25))+((3))*4", [4, 3, 25], 37),  # redundant parentheses, any order
        ("  95 - 39 +\n 10 ", [95, 39, 10], 66),  # whitespace and newlines
        ("8 × 3", [8, 3], 24),  # unicode operators are normalised
        ("12 ÷ 4 − 1", [12, 4, 1], 2),
        ("(8/3)*3", [8, 3, 3], 8),  # non-integer intermediate: accepted (exact rationals)
        ("(3-5)*(1-9)", [3, 5, 1, 9], 16),  # negative intermediates: accepted
        ("7*7/7", [7, 7, 7], 7),  # duplicates used once each
    ],
)
def test_verify_accepts(expr, nums, target):
    assert TASK.verify(expr, row(nums, target))


@pytest.mark.parametrize(
    "expr, nums, target",
    [
        ("1+2+3", [1, 2, 3], 7),  # wrong value
        ("1+2", [1, 2, 3], 3),  # missing number
        ("1+2+3+3", [1, 2, 3], 9),  # number reused
        ("1+2+4", [1, 2, 3], 7),  # number not given
        ("12+3", [1, 2, 3], 15),  # digits glued into another number
        ("3/(2-2)", [3, 2, 2], 1),  # division by zero
        ("2**3", [2, 3], 8),  # power (TinyZero loophole)
        ("7//2", [7, 2], 3),  # floor division (TinyZero loophole)
        ("7%4", [7, 4], 3),
        ("1.5*2", [1, 5, 2], 3),  # decimal slips through a digit-run check (TinyZero loophole)
        ("1.0*3", [1, 0, 3], 3),
        ("-3+5", [3, 5], 2),  # unary minus rejected
        ("+3+5", [3, 5], 8),  # unary plus rejected
        ("0x10+1", [0, 1], 17),
        ("1_0+1", [10, 1], 11),
        ("07+1", [7, 1], 8),
        ("__import__('os').getpid()", [], 0),
        ("abs(3)+5", [3, 5], 8),
        ("3+5 = 8", [3, 5], 8),  # equations are not expressions
        ("3<5", [3, 5], 1),
        ("", [], 0),
        ("1" * 201, [int("1" * 201)], int("1" * 201)),  # over the length bound
        ("[3]+[5]", [3, 5], 8),
        ("(3,5)", [3, 5], 8),
        ("3 5", [3, 5], 35),
    ],
)
def test_verify_rejects(expr, nums, target):
    assert not TASK.verify(expr, row(nums, target))


def test_verify_non_string_and_magnitude():
    assert not TASK.verify(None, row([1], 1))
    assert not TASK.verify(b"1+2", row([1, 2], 3))
    big = 10**60
    assert not TASK.verify(f"{big}*{big}", row([big, big], big * big))  # 10**120 exceeds the magnitude bound


def _hostile_strings(rng: random.Random, count: int) -> list[str]:
    fixed = [
        "__import__('builtins').__dict__.__setitem__('NGC_PWNED', 1)",
        "open('/tmp/ngc_pwned', 'w')",
        "globals().update(x=1)",
        "9**9**9",
        "9**9**9**9",
        "10**100000",
        "2**10**10",
        "(" * 10_000 + "1" + ")" * 10_000,
        "(" * 99 + "1" + ")" * 99,
        "(" * 150 + "1" + ")" * 150,
        "-" * 150 + "1",
        "1" + "+1" * 99,
        "9" * 100_000,
        "1" * 199,
        "\x00",
        "1+\x002",
        "\ufeff1+2",
        "１＋２",  # full-width digits
        "١+٢",  # Arabic-Indic digits
        "1+2\u200b",
        "lambda: 1",
        "(yield)",
        "[x for x in ()]",
        "f'{1}'",
        "'a'*10**9",
        "1 if 1 else 2",
        "\\",
        "#",
        "1e308*1e308",
        "ÿ" * 5000,
        "<answer>" * 1000,
    ]
    alphabet = list("0123456789+-*/()  .,_=<>%^&|~!'\"[]{}:;\\\nabcxyzé×÷−\x00") + [
        "**",
        "//",
        "__",
        "import",
        "(",
    ]
    out = list(fixed)
    while len(out) < count:
        length = rng.choice([1, 3, 8, 20, 60, 199, 200, 201, 1000])
        out.append("".join(rng.choice(alphabet) for _ in range(length)))
    return out


def test_fuzz_hostile_inputs_no_exception_no_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(1234)
    strings = _hostile_strings(rng, 4000)
    start = time.perf_counter()
    slowest = 0.0
    for s in strings:
        t0 = time.perf_counter()
        nums = [rng.randint(1, 99) for _ in range(rng.randint(0, 5))]
        assert TASK.verify(s, row(nums, rng.randint(0, 100))) in (True, False)
        wrapped = f"thinking {s} <answer>{s}</answer> tail"
        assert TASK.score(wrapped, row(nums, 24), 0.1) in (0.0, 0.1, 1.0)
        assert TASK.extract_answer(s) is None or isinstance(TASK.extract_answer(s), str)
        slowest = max(slowest, time.perf_counter() - t0)
    assert time.perf_counter() - start < 10.0
    assert slowest < 0.5
    assert not hasattr(builtins, "NGC_PWNED")
    assert not (tmp_path / "ngc_pwned").exists()
    assert not list(tmp_path.iterdir())


def test_extract_answer_bounded_and_last():
    assert TASK.extract_answer("<answer> 1+2 </answer> then <answer>3*4</answer>") == "3*4"
    assert TASK.extract_answer("no tags here") is None
    assert TASK.extract_answer("<answer>1+2") is None
    assert TASK.extract_answer("1+2</answer>") is None
    assert TASK.extract_answer("<answer>" + "1+" * 200 + "1</answer>") is None  # over 200 characters
    huge = "x" * 100_000 + "<answer>(1+2)/3</answer>" + "</answer>" * 10_000
    t0 = time.perf_counter()
    assert TASK.extract_answer(huge) is None  # the last closing tag has no nearby opening tag
    assert TASK.extract_answer("x" * 200_000 + "<answer>(1+2)/3</answer>") == "(1+2)/3"
    assert time.perf_counter() - t0 < 0.1


# ----------------------------------------------------------------------------- rewards
def test_score_values():
    p = row([1, 2, 3], 1)
    assert TASK.score("<think>x</think><answer> (1 + 2) / 3 </answer>", p) == 1.0
    assert TASK.score("<answer>1+2+3</answer>", p) == 0.0
    assert TASK.score("<answer>1+2+3</answer>", p, format_reward=0.1) == 0.1
    assert TASK.score("<answer>1.5*2</answer>", row([1, 5, 2], 3), format_reward=0.1) == 0.1
    assert TASK.score("(1+2)/3", p, format_reward=0.1) == 0.0


def test_countdown_reward_strings_and_chat_lists():
    completions = [
        [{"role": "assistant", "content": "<answer>(1+2)/3</answer>"}],
        [{"role": "assistant", "content": "<answer>1+2+3</answer>"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "<answer>3*8</answer>"}]}],
        "<answer>25+3*4</answer>",
        "no answer",
    ]
    nums = [[1, 2, 3], [1, 2, 3], [8, 3], [25, 3, 4], [1, 2]]
    target = [1, 1, 24, 37, 3]
    rewards = TASK.reward_func(prompts=[None] * 5, completions=completions, nums=nums, target=target)
    assert rewards == [1.0, 0.0, 1.0, 1.0, 0.0]
    rewards = TASK.reward_func(
        None, completions, nums=nums, target=target, format_reward=0.1, trainer_state=None
    )
    assert rewards == [1.0, 0.1, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- generator and solver
def test_generator_solvable_deterministic_and_in_range():
    problems = generate_problems(400, seed=7)
    assert problems == generate_problems(400, seed=7)
    assert problems[:50] != generate_problems(50, seed=8)
    assert generate_problems(50, seed=7) == problems[:50]  # a prefix: instance i depends only on the seed
    counts = {3: 0, 4: 0}
    for p in problems:
        assert 10 <= p["target"] <= 100 and all(1 <= x <= 99 for x in p["nums"])
        counts[len(p["nums"])] += 1
        expr = solve(p["nums"], p["target"])
        assert expr is not None and TASK.verify(expr, p)
    assert min(counts.values()) > 120  # about half 3-number, half 4-number


def test_generator_ranges_and_speed():
    problems = generate_problems(50, seed=0, count_range=(5, 5), num_range=(1, 20), target_range=(200, 300))
    assert all(len(p["nums"]) == 5 and 200 <= p["target"] <= 300 for p in problems)
    t0 = time.perf_counter()
    generate_problems(1000, seed=1)
    assert time.perf_counter() - t0 < 2.5  # ~0.3 s here: 20k instances take ~5 s


def test_generated_splits_are_disjoint():
    key = lambda p: (tuple(sorted(p["nums"])), p["target"])  # noqa: E731
    train = {key(p) for p in generate_problems(1000, seed=0, split="train")}
    test = {key(p) for p in generate_problems(100, seed=0, split="test")}
    assert not train & test


def test_solve_unsolvable_and_trivial():
    assert solve([1, 1, 1], 100) is None
    assert solve([7], 7) == "7"
    assert TASK.verify(solve([3, 5, 7, 8], 24), row([3, 5, 7, 8], 24))


# ----------------------------------------------------------------------------- search traces
def _replay_trace(trace: str, nums: list[int], target: int) -> None:
    """Check every line of a trace against the arithmetic and the state it claims (an honest search)."""
    lines = trace.strip("\n").split("\n")
    state = list(nums)
    root_stack = [list(nums)]
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a // b,
    }
    step = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
    for line in lines[:-3]:
        restated = line.startswith("target ")  # a two-number line restates the target first
        if restated:
            head, line = line.split(": ", 1)
            assert head == f"target {target}", head
        if line.startswith("back "):
            state = [int(x) for x in line[5:].split()]
            assert state in root_stack, line
            continue
        moves = step.findall(line)
        for a, op, b, c in moves:
            a, b, c = int(a), int(b), int(c)
            assert a >= b and ops[op](a, b) == c and (op != "/" or a % b == 0), line
        if " left " in line:
            ((a, op, b, c),) = moves
            rest = list(state)
            rest.remove(int(a))
            rest.remove(int(b))
            claimed = [int(x) for x in line.split(" left ")[1].split()]
            # the untouched numbers (as a multiset: duplicates are indistinguishable), then the result
            assert sorted(claimed[:-1]) == sorted(rest) and claimed[-1] == int(c), line
            state = claimed
            root_stack.append(state)
        else:  # a leaf: the two numbers of the state, the last result is the target iff "yes"
            assert restated, line
            assert sorted({int(moves[0][0]), int(moves[0][2])}) == sorted(set(state)), line
            hit = int(moves[-1][3]) == target
            assert line.endswith(" yes") == hit and all(int(m[3]) != target for m in moves[:-1]), line


def test_search_traces_are_honest_and_verify():
    lengths = []
    for p in generate_problems(300, seed=3, count_range=(3, 3), num_range=(1, 10), target_range=(10, 50)):
        trace = search_trace(p["nums"], p["target"])
        assert trace.startswith("\n") and trace.endswith("</answer>")
        assert "\n</think>\n<answer>" in trace and "\nfound " in trace
        assert TASK.score(trace, p) == 1.0
        assert sum(line.endswith(" yes") for line in trace.split("\n")) == 1
        _replay_trace(trace, p["nums"], p["target"])
        lengths.append(len(trace))
    lengths.sort()
    assert 60 <= lengths[len(lengths) // 20] and lengths[-len(lengths) // 20] <= 800
    assert 200 <= lengths[len(lengths) // 2] <= 420


def test_search_trace_shuffled_and_four_numbers():
    for p in generate_problems(40, seed=5, count_range=(4, 4), num_range=(1, 10), target_range=(10, 50)):
        trace = search_trace(p["nums"], p["target"], random.Random(0), max_chars=4000)
        if trace is None:
            continue
        assert TASK.score(trace, p) == 1.0
        _replay_trace(trace, p["nums"], p["target"])


def test_search_trace_controls_and_docstring_example():
    example = search_trace([4, 4, 10], 44)
    body = "\n".join("    " + line for line in example.strip("\n").split("\n"))
    assert body in countdown.__doc__  # the documented example is real output
    assert search_trace([4, 4, 10], 44, max_chars=50) is None
    assert search_trace([3, 5, 7, 8], 24, random.Random(5)) == search_trace(
        [3, 5, 7, 8], 24, random.Random(5)
    )
    assert search_trace([3, 5, 7, 8], 24, random.Random(5)) != search_trace([3, 5, 7, 8], 24)
    plain = search_trace([4, 4, 10], 44, restate_target=False)
    assert plain == example.replace("target 44: ", "") and "target" not in plain
    with pytest.raises(ValueError):
        search_trace([1, 1, 1], 100)


# ----------------------------------------------------------------------------- prompts and datasets
def test_prompts():
    messages = TASK.build_prompt(
        row([3, 5, 7, 8], 24), eviction_rate_tag="<eviction_rate>50%</eviction_rate>"
    )
    assert [m["role"] for m in messages] == ["user"]
    assert "[3, 5, 7, 8]" in messages[0]["content"] and "equals 24" in messages[0]["content"]
    assert "<answer> (1 + 2) / 3 </answer>" in messages[0]["content"]
    assert messages[0]["content"].endswith("<eviction_rate>50%</eviction_rate>")
    with_prefill = TASK.build_prompt(row([1, 2], 3), prefill=True, system_prompt="sys")
    assert [m["role"] for m in with_prefill] == ["system", "user", "assistant"]
    assert with_prefill[-1]["content"] == PREFILL
    assert TASK.build_plain_prompt(row([3, 5, 7, 8], 24)) == "nums 3 5 7 8 target 24\n<think>"
    assert TASK.build_plain_prompt(row([1, 2], 3), "<e>") == "nums 1 2 target 3 <e>\n<think>"


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "|".join(m["content"] for m in messages) + "|assistant:"


def test_format_prompt_with_and_without_chat_template():
    p = row([1, 2], 3)
    text = TASK.format_prompt(p, _ChatTokenizer(), eviction_rate_tag="<e>")
    assert text.endswith("<e>|assistant:" + PREFILL)
    assert TASK.format_prompt(p, _ChatTokenizer(), prefill=False).endswith("|assistant:")
    assert TASK.format_prompt(p, None) == TASK.build_plain_prompt(p)

    class Plain:
        chat_template = None

    assert TASK.format_prompt(p, Plain()) == TASK.build_plain_prompt(p)


def test_load_countdown_generated():
    train = TASK.load("generated", n=40, seed=0, split="train")
    test = TASK.load("generated", n=10, seed=0, split="test", prompt_format="plain")
    assert train.column_names == ["prompt", "nums", "target"] and len(train) == 40
    assert train[0]["prompt"][-1] == {"role": "assistant", "content": PREFILL}
    assert test[0]["prompt"].startswith("nums ") and len(test) == 10
    third = train[3]
    assert solve(third["nums"], third["target"]) is not None


def test_load_countdown_local_jsonl(tmp_path):
    path = tmp_path / "countdown.jsonl"
    rows = [{"target": 24, "nums": [3, 5, 7, 8], "extra": i} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = TASK.load(str(path), split="all", prefill=False)
    assert len(ds) == 5 and ds.column_names == ["prompt", "nums", "target"]
    assert ds[0]["nums"] == [3, 5, 7, 8] and ds[0]["prompt"][-1]["role"] == "user"
    assert len(TASK.load(str(path), split="train", n=2)) == 2
    assert len(TASK.load(str(path), split="test")) == 0  # rows [327680, 328704) do not exist
    with pytest.raises(ValueError):
        TASK.load(str(path), split="validation")
