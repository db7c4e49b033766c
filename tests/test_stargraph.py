"""StarGraph task: generator (path-star structure, splits), path verifier, hostile fuzz, traces, rewards."""

import builtins
import random
import time
from collections import Counter

import pytest

from ngc_trl.tasks import TASKS, get_task, stargraph
from ngc_trl.tasks.base import PREFILL
from ngc_trl.tasks.stargraph import TASK, arms, generate_problems, solution_trace, solve

# source 12; arms 12>5>33>40, 12>7>2, 12>9>11>60
G = {
    "edges": [[7, 2], [12, 5], [33, 40], [12, 7], [5, 33], [11, 60], [12, 9], [9, 11]],
    "source": 12,
    "goal": 40,
}


# ----------------------------------------------------------------------------- registry
def test_registered():
    assert (
        TASKS["stargraph"] is TASK and get_task("stargraph") is TASK and isinstance(TASK, stargraph.StarGraph)
    )
    assert TASK.reward_func is TASK.reward_func and TASK.reward_func.__name__ == "stargraph_reward"


# ----------------------------------------------------------------------------- generator
def _check_path_star(p, d_range=(3, 3), l_range=(4, 5), label_range=(0, 99)):
    """Assert the path-star structure: d arms of l-1 nodes, distinct labels, exactly one arm ends at the goal."""
    edges, source, goal = p["edges"], p["source"], p["goal"]
    nodes = [source] + [b for _, b in edges]
    assert len(set(nodes)) == len(nodes)  # every non-source node has exactly one incoming edge
    assert all(label_range[0] <= x <= label_range[1] for x in nodes)
    assert all(a in set(nodes) for a, _ in edges)
    chains = arms(edges, source)
    d = len(chains)
    assert d_range[0] <= d <= d_range[1]
    lengths = {len(c) for c in chains}
    assert len(lengths) == 1 and l_range[0] <= lengths.pop() + 1 <= l_range[1]  # equal arms of l nodes
    assert sum(len(c) for c in chains) == len(edges) == len(nodes) - 1  # the arms cover the graph
    assert sum(c[-1] == goal for c in chains) == 1  # exactly one arm reaches the goal, at its end
    assert all(goal not in c[:-1] for c in chains)
    out_degree = Counter(a for a, _ in edges)
    assert out_degree[source] == d and out_degree[goal] == 0
    path = solve(edges, source, goal)
    assert path is not None and path[0] == source and path[-1] == goal and len(path) == len(chains[0]) + 1
    return path


def test_generator_structure_deterministic():
    problems = generate_problems(400, seed=7)
    assert problems == generate_problems(400, seed=7)
    assert generate_problems(50, seed=7) == problems[:50]  # instance i depends only on the seed
    assert problems[:50] != generate_problems(50, seed=8)
    lengths = Counter()
    for p in problems:
        path = _check_path_star(p)
        lengths[len(path)] += 1
        assert TASK.verify(",".join(map(str, path)), p)
    assert lengths[4] > 150 and lengths[5] > 150 and set(lengths) == {4, 5}
    # edges are shuffled: without the shuffle every edge list would start with an edge out of the source
    starts_at_source = sum(p["edges"][0][0] == p["source"] for p in problems)
    assert 40 < starts_at_source < 200  # ~1/4 (3 of 12-15 edges)


def test_generator_ranges_and_errors():
    for p in generate_problems(40, seed=1, degree=(2, 5), path_length=(2, 8), label_range=(100, 200)):
        _check_path_star(p, (2, 5), (2, 8), (100, 200))
    with pytest.raises(ValueError):
        generate_problems(
            1, seed=0, degree=(3, 3), path_length=(5, 5), label_range=(0, 11)
        )  # needs 13 labels
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, path_length=(1, 3))
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, split="validation")
    t0 = time.perf_counter()
    generate_problems(2000, seed=2, split="test")
    assert time.perf_counter() - t0 < 3.0


def test_generated_splits_are_disjoint():
    key = lambda p: (tuple(sorted(map(tuple, p["edges"]))), p["source"], p["goal"])  # noqa: E731
    train = generate_problems(1500, seed=0, split="train")
    test = generate_problems(150, seed=0, split="test")
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert all(stargraph._split_of(p["edges"], p["source"], p["goal"]) == "test" for p in test)
    p = test[0]
    assert stargraph._split_of(p["edges"][::-1], p["source"], p["goal"]) == "test"  # edge order is ignored
    unfiltered = generate_problems(800, seed=5)
    share = sum(stargraph._split_of(p["edges"], p["source"], p["goal"]) == "test" for p in unfiltered) / 800
    assert 0.02 < share < 0.12  # ~1/16


# ----------------------------------------------------------------------------- parser and verifier
@pytest.mark.parametrize("answer", ["12,5,33,40", "12, 5, 33, 40", " 12 ,5,\t33,40 "])
def test_verify_accepts(answer):
    assert TASK.verify(answer, G)


@pytest.mark.parametrize(
    "answer",
    [
        "12,5,40",  # skips a node: 5>40 is not an edge
        "12,33,40",
        "12,40",
        "40,33,5,12",  # reversed: edges are directed
        "5,33,40",  # does not start at the source
        "12,5,33",  # does not reach the goal
        "12,9,11,60",  # another arm
        "12,5,33,40,33,40",  # repeats nodes
        "12,5,33,40,12,5,33,40",
        "12,7,2,40",  # 2>40 is not an edge
        "12,5,99,40",  # node not in the graph
        "12 5 33 40",  # separators
        "12;5;33;40",
        "12->5->33->40",
        "12,5,33,40,",
        "[12,5,33,40]",
        "12,5,33,4e1",
        "12,5,33,0x28",
        "12,5,33,４０",  # full-width digits
        "12,5,33,٤٠",  # Arabic-Indic digits
        "12,5,33," + "0" * 12 + "40",  # over 12 digits
        "",
        "12,5,33,40" + " " * 400,  # over 400 characters
    ],
)
def test_verify_rejects(answer):
    assert not TASK.verify(answer, G)


def test_verify_checks_edges_not_a_stored_answer():
    # a different graph with the same source and goal: the path must follow its edges
    other = {"edges": [[12, 8], [8, 40], [12, 5], [5, 33]], "source": 12, "goal": 40}
    assert TASK.verify("12,8,40", other) and not TASK.verify("12,5,33,40", other)
    # a non-tree graph with two routes: both verify, and a cycle is rejected
    diamond = {"edges": [[1, 2], [1, 3], [2, 4], [3, 4], [4, 1]], "source": 1, "goal": 4}
    assert TASK.verify("1,2,4", diamond) and TASK.verify("1,3,4", diamond)
    assert not TASK.verify("1,2,4,1,3,4", diamond)
    assert not TASK.verify(None, G) and not TASK.verify(b"12,5,33,40", G)
    assert not TASK.verify("1,2,3", {"edges": [[1, 2], [3, 2]], "source": 1, "goal": 3})  # 2>3 is not listed
    assert solve(diamond["edges"], 4, 3) == [4, 1, 3] and solve(G["edges"], 40, 12) is None


def test_parse_and_extract():
    assert TASK.parse_path("1, 2,3") == [1, 2, 3] and TASK.parse_path("007") == [7]
    assert (
        TASK.parse_path("1,,2") is None and TASK.parse_path("-1,2") is None and TASK.parse_path("1 2") is None
    )
    assert TASK.extract_answer("<answer>1,2</answer> then <answer> 12,5,33,40 </answer>") == "12,5,33,40"
    assert TASK.extract_answer("<answer><answer>12,5</answer>") == "12,5"  # nested: the innermost
    assert TASK.extract_answer("<answer>12,5") is None and TASK.extract_answer("12,5</answer>") is None
    assert TASK.extract_answer("<answer>" + "1," * 250 + "1</answer>") is None  # over 400 characters
    t0 = time.perf_counter()
    assert TASK.extract_answer("x" * 200_000 + "<answer>12,5,33,40</answer>" + "</answer>" * 10_000) is None
    assert time.perf_counter() - t0 < 0.1


def _hostile_strings(rng: random.Random, count: int) -> list[str]:
    fixed = [
        "__import__('builtins').__dict__.__setitem__('NGC_PWNED', 1)",
        "__import__('os').system('touch ngc_pwned')",
        "open('ngc_pwned', 'w')",
        "9**9**9",
        "12,5,33,10**100000",
        "12,5,33," + "9" * 100_000,
        "9" * 100_000,
        "1," * 50_000 + "1",
        ",".join(["12"] * 200) + ",40",
        "(" * 10_000 + "12,5,33,40" + ")" * 10_000,
        "[" * 5000 + "]" * 5000,
        "12,5,33,４０",
        "１２,５,３３,４０",
        "𝟏𝟐,5,33,40",
        "12,5,33,40\x00",
        "\ufeff12,5,33,40",
        "12,5,\u200b33,40",
        "<answer>" * 1000,
        "<answer>12,5,33,40</answer>" * 1000,
        "<answer><answer><answer>12,5,33,40</answer></answer></answer>",
        "ÿ" * 5000,
        "12,5,33,40" + "\n" * 50_000,
        "12" + " " * 100_000 + ",5",
        ",,,,",
        "-12,-5",
    ]
    alphabet = list("0123456789,;>-  \n\t.()[]<>eE'\"é\x00１٢") + [
        "**",
        "->",
        "<answer>",
        "</answer>",
        "9" * 20,
        "12,",
        "5,",
        "33,",
        "40",
    ]
    out = list(fixed)
    while len(out) < count:
        length = rng.choice([1, 3, 8, 20, 60, 199, 400, 401, 1000])
        out.append("".join(rng.choice(alphabet) for _ in range(length)))
    return out


def test_fuzz_hostile_inputs_no_exception_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(99)
    problems = generate_problems(20, seed=1) + [G]
    strings = _hostile_strings(rng, 3000)
    start, slowest = time.perf_counter(), 0.0
    for s in strings:
        t0 = time.perf_counter()
        p = rng.choice(problems)
        assert TASK.verify(s, p) in (True, False)
        wrapped = f"think {s} <answer>{s}</answer> tail"
        assert TASK.score(wrapped, p, 0.1) in (0.0, 0.1, 1.0)
        assert TASK.score(s, p) in (0.0, 1.0)
        assert TASK.parse_path(s) is None or all(type(v) is int for v in TASK.parse_path(s))
        assert TASK.extract_answer(s) is None or isinstance(TASK.extract_answer(s), str)
        slowest = max(slowest, time.perf_counter() - t0)
    assert time.perf_counter() - start < 5.0
    assert slowest < 0.2
    assert not hasattr(builtins, "NGC_PWNED") and not list(tmp_path.iterdir())
    assert not any(TASK.verify(s, G) for s in strings[:17])


# ----------------------------------------------------------------------------- rewards
def test_score_and_reward():
    e, s, g = G["edges"], G["source"], G["goal"]
    assert TASK.score("<think>40</think><answer>12,5,33,40</answer>", G) == 1.0
    assert TASK.score("<answer>12,9,11,60</answer>", G) == 0.0
    assert TASK.score("<answer>12,9,11,60</answer>", G, format_reward=0.1) == 0.1
    assert TASK.score("12,5,33,40", G, format_reward=0.1) == 0.0  # no tags
    assert TASK.score("<answer>12,5,33,40</answer> or <answer>12,40</answer>", G) == 0.0  # the last counts
    completions = [
        [{"role": "assistant", "content": "<answer>12,5,33,40</answer>"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "<answer>12,9,11,60</answer>"}]}],
        "<answer>12,7,2</answer>",
        "no answer",
    ]
    edges, source, goal = [e] * 4, [s] * 4, [g, 60, g, g]
    assert TASK.reward_func(
        prompts=[None] * 4, completions=completions, edges=edges, source=source, goal=goal
    ) == [1.0, 1.0, 0.0, 0.0]
    assert TASK.reward_func(
        None, completions, edges=edges, source=source, goal=goal, format_reward=0.1, trainer_state=None
    ) == [1.0, 1.0, 0.1, 0.0]


# ----------------------------------------------------------------------------- traces
def test_solution_traces_verify():
    rng = random.Random(0)
    for p in generate_problems(300, seed=3) + generate_problems(
        20, seed=4, degree=(2, 6), path_length=(2, 12)
    ):
        trace = solution_trace(p, rng)
        assert trace.startswith(f"\ngoal {p['goal']}\n") and trace.endswith("</answer>")
        assert f"\nstart {p['source']}\n</think>\n<answer>" in trace
        assert TASK.score(trace, p) == 1.0
        path = solve(p["edges"], p["source"], p["goal"])
        walked = trace.split("\n")[2:-3]  # the edge lines, goal first
        assert walked == [f"{a}>{b}" for a, b in zip(path, path[1:])][::-1]
        assert all(line in TASK.build_plain_prompt(p) for line in walked)


def test_solution_trace_example_and_errors():
    example = solution_trace(
        {"edges": [[7, 2], [12, 5], [33, 40], [12, 7], [5, 33]], "source": 12, "goal": 40}
    )
    body = "\n".join("    " + line for line in example.strip("\n").split("\n"))
    assert body in stargraph.__doc__  # the documented example is real output
    with pytest.raises(ValueError, match="not reachable"):
        solution_trace({**G, "goal": 12, "source": 40})


def test_search_traces_are_honest_and_verify():
    for p in generate_problems(300, seed=5) + generate_problems(
        20, seed=6, degree=(2, 6), path_length=(2, 9)
    ):
        trace = stargraph.search_trace(p)
        assert TASK.score(trace, p) == 1.0
        lines = trace.strip("\n").split("\n")
        assert lines[-2:] == [
            "</think>",
            f"<answer>{','.join(map(str, solve(p['edges'], p['source'], p['goal'])))}</answer>",
        ]
        edges = {(a, b) for a, b in p["edges"]}
        firsts = [b for a, b in p["edges"] if a == p["source"]]  # the arms in prompt order
        for k, line in enumerate(lines[:-2]):
            head, walk = line.split(": ", 1)
            assert head == f"goal {p['goal']}"
            *steps, verdict = walk.split(" ")
            nodes = [p["source"]] + [int(step.split(">")[1]) for step in steps]
            assert steps[0] == f"{p['source']}>{firsts[k]}"  # the k-th untried arm
            assert all((int(s.split(">")[0]), int(s.split(">")[1])) in edges for s in steps)
            assert all(int(s.split(">")[0]) == nodes[i] for i, s in enumerate(steps))  # a connected walk
            assert not any(a == nodes[-1] for a, _ in edges)  # walked to the arm's end
            assert verdict == ("yes" if nodes[-1] == p["goal"] else "no") and (verdict == "yes") == (
                k == len(lines) - 3
            )
    plain = stargraph.search_trace(G, restate_goal=False)
    assert plain == stargraph.search_trace(G).replace(f"goal {G['goal']}: ", "") and "goal" not in plain


def test_search_trace_example_and_errors():
    example = stargraph.search_trace(
        {"edges": [[7, 2], [12, 7], [33, 40], [12, 5], [5, 33]], "source": 12, "goal": 40}
    )
    body = "\n".join("    " + line for line in example.strip("\n").split("\n"))
    assert body in stargraph.__doc__  # the documented example is real output
    with pytest.raises(ValueError, match="no arm"):
        stargraph.search_trace({**G, "goal": 33})


# ----------------------------------------------------------------------------- prompts and datasets
def test_prompts():
    messages = TASK.build_prompt(G, eviction_rate_tag="<eviction_rate>50%</eviction_rate>")
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert "7>2, 12>5, 33>40, 12>7, 5>33, 11>60, 12>9, 9>11." in content  # the given (shuffled) order
    assert "from node 12 to node 40" in content and "<answer>1,8,3,5</answer>" in content
    assert content.endswith("<eviction_rate>50%</eviction_rate>")
    with_prefill = TASK.build_prompt(G, prefill=True, system_prompt="sys")
    assert [m["role"] for m in with_prefill] == ["system", "user", "assistant"]
    assert with_prefill[-1]["content"] == PREFILL
    small = {"edges": [[7, 2], [12, 7]], "source": 12, "goal": 2}
    assert TASK.build_plain_prompt(small) == "edges 7>2 12>7 from 12 to 2\n<think>"
    assert TASK.build_plain_prompt(small, "<e>") == "edges 7>2 12>7 from 12 to 2 <e>\n<think>"

    class Chat:
        chat_template = "t"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + "|assistant:"

    assert TASK.format_prompt(G, Chat()).endswith("|assistant:" + PREFILL)
    assert TASK.format_prompt(G) == TASK.build_plain_prompt(G)


def test_load_stargraph():
    train = TASK.load("generated", 40, seed=0, split="train")
    test = TASK.load("generated", 10, seed=0, split="test", prompt_format="plain", degree=(4, 4))
    assert train.column_names == ["prompt", "edges", "source", "goal"] and len(train) == 40
    assert train[0]["prompt"][-1] == {"role": "assistant", "content": PREFILL}
    assert test[0]["prompt"].startswith("edges ") and len(test) == 10
    assert all(len(arms(row["edges"], row["source"])) == 4 for row in test)
    row = train[3]
    path = ",".join(map(str, solve(row["edges"], row["source"], row["goal"])))
    assert TASK.reward_func(
        None, [f"<answer>{path}</answer>"], edges=[row["edges"]], source=[row["source"]], goal=[row["goal"]]
    ) == [1.0]
    with pytest.raises(ValueError):
        TASK.load("generated", 5, split="all")
