"""The task interface: the registry, the TRL reward function (name, pickling, columns), source checks and
split errors, shared by every task class."""

import functools
import json
import pickle
from types import SimpleNamespace

import pytest
from trl.trainer.utils import get_callable_name, is_async_callable

from ngc_trl.tasks import GENERATED_TASKS, TASKS, GeneratedTask, Task, get_task
from ngc_trl.train import make_reward

ROWS = {
    "countdown": ({"nums": [3, 5], "target": 8}, "<answer>3+5</answer>", "<answer>5-3</answer>"),
    "linsys": (
        {"coeffs": [[1, 1], [1, -1]], "rhs": [3, 1]},
        "<answer>x=2, y=1</answer>",
        "<answer>x=1</answer>",
    ),
    "stargraph": (
        {"edges": [[1, 2], [2, 3]], "source": 1, "goal": 3},
        "<answer>1,2,3</answer>",
        "<answer>1,3</answer>",
    ),
    "math": ({"answer": "204"}, "so \\boxed{204}", "Answer: 203"),
}


def test_registry_holds_one_task_object_per_name():
    assert set(TASKS) == set(ROWS) and GENERATED_TASKS == ("countdown", "linsys", "stargraph")
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name and get_task(name) is task and task.columns
        assert task.generated == isinstance(task, GeneratedTask) == (name in GENERATED_TASKS)
        assert task.reward_func is task.reward_func and task.reward_func.__name__ == f"{name}_reward"
    with pytest.raises(ValueError, match="valid tasks"):
        get_task("gsm8k")
    with pytest.raises(TypeError):
        Task()  # the interface itself cannot be instantiated


@pytest.mark.parametrize("name", sorted(ROWS))
def test_score_and_reward_agree_on_every_task(name):
    task = get_task(name)
    row, right, wrong = ROWS[name]
    assert task.score(right, row) == 1.0 and task.score(wrong, row) == 0.0
    assert task.score(wrong, row, format_reward=0.1) == 0.1 and task.score("no answer", row, 0.1) == 0.0
    assert task.score(right, {**row, "prompt": "ignored", "id": "x"}) == 1.0  # extra row keys are ignored
    columns = {c: [row[c]] * 3 for c in task.columns}
    chat = [[{"role": "assistant", "content": t}] for t in (right, wrong, "none")]
    assert task.reward_func(
        prompts=None, completions=chat, **columns, format_reward=0.1, trainer_state=None
    ) == [
        1.0,
        0.1,
        0.0,
    ]


def test_reward_function_pickles_and_keeps_its_logged_name():
    task = get_task("countdown")
    row, right, wrong = ROWS["countdown"]
    columns = {c: [row[c]] * 2 for c in task.columns}
    copy = pickle.loads(pickle.dumps(task.reward_func))
    assert copy(None, [right, wrong], **columns) == [1.0, 0.0] and copy.__name__ == "countdown_reward"
    bound = functools.update_wrapper(functools.partial(task.reward_func, format_reward=0.1), task.reward_func)
    assert get_callable_name(bound) == "countdown_reward" and not is_async_callable(bound)
    assert bound(None, [right, wrong], **columns) == [1.0, 0.1]
    with pytest.raises(ValueError, match="countdown_reward: the dataset has no column 'target'"):
        task.reward_func(None, [right], nums=[row["nums"]])


@pytest.mark.parametrize("name", sorted(ROWS))
def test_make_reward_applies_reward_format_to_every_task(name):
    row, _, wrong = ROWS[name]
    func = make_reward(SimpleNamespace(task=name, reward_format=0.1))
    assert get_callable_name(func) == f"{name}_reward"
    assert func(None, [wrong, "none"], **{c: [row[c]] * 2 for c in get_task(name).columns}) == [0.1, 0.0]


def test_generated_sources_are_checked_early():
    countdown, linsys, stargraph = (get_task(n) for n in GENERATED_TASKS)
    for task in (countdown, linsys, stargraph):
        task.check_source(None)
        task.check_source("generated")
        task.check_source("generated:testbed")
        with pytest.raises(ValueError, match=f"unknown {task.name} distribution 'nope'"):
            task.check_source("generated:nope")
        with pytest.raises(ValueError, match="must be 'generated' or 'generated:<name>'"):
            task.check_source("generatedX")
    countdown.check_source("Jiayi-Pan/Countdown-Tasks-3to4")  # a Hub name or a file: checked when it loads
    countdown.check_source("rows.jsonl")
    for task in (linsys, stargraph):
        with pytest.raises(ValueError, match="must be 'generated' or 'generated:<name>'"):
            task.check_source("Jiayi-Pan/Countdown-Tasks-3to4")
        with pytest.raises(ValueError, match="must be 'generated'"):
            task.load("rows.jsonl", n=2)
    assert linsys.distribution("generated:testbed") == {
        "num_vars": (2, 2),
        "coef_range": (-4, 4),
        "solution_range": (-5, 5),
    }


def test_generated_load_refuses_bad_splits_and_formats():
    countdown, linsys = get_task("countdown"), get_task("linsys")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'validation'"):
        linsys.load("generated", 2, split="validation")
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'all'"):
        countdown.load("generated", 2, split="validation")
    with pytest.raises(ValueError, match="generated data has no 'all' split"):
        countdown.load("generated", 2, split="all")
    with pytest.raises(ValueError, match="prompt_format"):
        linsys.load("generated", 2, prompt_format="markdown")
    # the same instance columns whatever the prompt format
    chat, plain = (linsys.load("generated:testbed", 3, prompt_format=f) for f in ("chat", "plain"))
    assert chat.column_names == plain.column_names == ["prompt", "coeffs", "rhs"]
    assert chat["coeffs"] == plain["coeffs"] and plain[0]["prompt"] == linsys.build_plain_prompt(plain[0])


def test_math_sources_are_checked_early(tmp_path):
    math = get_task("math")
    for source in (None, "generated", "BytedTsinghua-SIA/DAPO-Math-17k"):
        math.check_source(source, "train")
    math.check_source(None, "test")  # nothing named yet: evaluation asks for a set when it loads
    with pytest.raises(ValueError, match="no such file"):
        math.check_source(str(tmp_path / "missing.parquet"), "train")
    with pytest.raises(ValueError, match="unknown math set 'gsm8k'"):
        math.check_source("gsm8k", "test")
    with pytest.raises(ValueError, match="split"):
        math.check_source(None, "validation")
    with pytest.raises(FileNotFoundError, match="aime25.jsonl"):
        math.check_source("aime25", "test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        math.check_source(None, "aime24", data_dir=tmp_path)
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "P", "answer": "1"}) + "\n")
    math.check_source(None, "aime24", data_dir=tmp_path)
    math.check_source("aime24", "test", data_dir=tmp_path)
    math.check_source("org/amc25", "amc25", data_dir=tmp_path)  # a Hub dataset replaces the missing file
    with pytest.raises(ValueError, match="timeout_s"):
        math.with_timeout(0)
    assert math.with_timeout(1.5).timeout_s == 1.5 and math.timeout_s == 5.0
