"""Pins: the task classes generate the same problems, prompts, parses and rewards as the per-module task
code they replaced (commit 94c6d16, where every value below was computed), so committed results
regenerate identically.

Each digest is the SHA-256 of ``json.dumps(value, sort_keys=True)`` of what :func:`compute` builds for its
key; a few rows are spelled out in full.
"""

import hashlib
import json

import pytest

from ngc_trl import testbed
from ngc_trl.evaluation.learning_curve import load_validation_problems
from ngc_trl.tasks import countdown, get_task, linsys, stargraph

TAG = "<eviction_rate>50%</eviction_rate>"

DIGESTS = {
    "load/countdown/generated/test/chat/True": "f904da2af43e3e324f24c09e8bcbe43a9af84c0ea49dbce07c22e74844244c6f",
    "load/countdown/generated/train/chat/False": "4f63cd5d6c787ee4a1d9f6409f3bdc5bacaabf98caf356cbb3d618a5da63f67a",
    "load/countdown/generated:testbed/train/plain/True": "73608bf1162cd928344063848983c44c1f45d4135e66f2c01814c9c69099b5c0",
    "load/countdown/generated:testbed/test/plain/True": "b916d6dbe08d9b577a6ddab5ae0478d609e0c5ce3f12b294dd0583ba229da037",
    "tagged/countdown/generated:testbed/chat": "8a2af131a83fc5cd2ce556a902d5770bd469a3c85618cae65c55fd4ea8df9533",
    "tagged/countdown/generated/plain": "db36d631664367a39697c7272101f9745d46eff22ea0aabcbaa5e2c1bc47ae50",
    "score/countdown/generated:testbed": "ee51874fdc78c3f0c1990f9e06e7ceae833379fe35e94b18cf99bdc1b686d20a",
    "reward/countdown/generated": "ee51874fdc78c3f0c1990f9e06e7ceae833379fe35e94b18cf99bdc1b686d20a",
    "extract/countdown/generated": "3a0c6d8a5efb2cc38cdc108e8d71ca93f0671443964f34514a7e119e7f5fc958",
    "format_prompt/countdown/generated": "dd1c881a55fff13ddba1bcda3eb2563604443cb44fb4972494c12aa8d12435e6",
    "build_prompt/countdown/generated:testbed": "3dd64d4eefff94fd4e2c00ffd82d3aad26c8e48cbc82f226db89c3610644ee9d",
    "validation/countdown/generated:testbed": "7cd4fb938fcbe60d1b827b0a4a8c249ae91383708e3f8994d994183bb02448ce",
    "testbed_sft/countdown": "0a7fe21191facf37b011670faf1ef675b25d9edf54ee2796d0675eb095f7fd70",
    "testbed_test/countdown": "08d4f3d94821ce4dd00fbd4d4b05e80cd9097fd8226a31a2be1d5ed3a4be0ed1",
    "load/linsys/generated/test/chat/True": "53d7a72fb896b2a8152d9e98e4b7905d5f8ad98ea5ce35fdd7f183cc93405cf0",
    "load/linsys/generated/train/chat/False": "e8920f7ecd37a2930facd627a39c71b7844dffc40305d2719bcd5fbfac619a73",
    "load/linsys/generated:testbed/train/plain/True": "ee3b1ac1ab532d08dd24aa0e01a47b0c98ffdfce18e19104a88ba8c809baa533",
    "load/linsys/generated:testbed/test/plain/True": "1ab337b7d238873bca5ec002228e9576d7dd95a07204a98876ed73938359188b",
    "tagged/linsys/generated:testbed/chat": "3ac11361f663dc4356aac88ef7921ebe7936508fdfe36f9de563640758a57631",
    "tagged/linsys/generated/plain": "0a7f6d92c09b4199d935a018b83127aa40de1be14809b4abc9ea3d8809bd6704",
    "score/linsys/generated:testbed": "f0da4869dceebcb92517d954b20758ec2625e7ba535af6082178d34c26bcaafa",
    "reward/linsys/generated": "9994b4a0b02fab3470a226bf69d95fc2aae239aae40135300fae113ca4f3da82",
    "extract/linsys/generated": "e11ab609b4f38ec650165a86458759ca01dfbb89c1d3c6d5f7b7a2770b5c8d7d",
    "format_prompt/linsys/generated": "6c38d73fee56f40b2a9eb66194a1e84d879048da33cc37cd89fe110e3b327f2f",
    "build_prompt/linsys/generated:testbed": "c2f8ae65a607d2e164b2f0724ee9c143cd7cb76f0a9105cfde063df2d83bc550",
    "validation/linsys/generated:testbed": "acc5f80b02a217b55f38748a61a125db6161326f5385b02dac3d2a43b33ec133",
    "testbed_sft/linsys": "b2324d047b1121246012e452bbcc02d8b20398e966d64fc3795e4ae43fab2252",
    "testbed_test/linsys": "d02acea80520234d965b4d504413eb050537a614f6c29a9b407cdb2fd68d21f8",
    "load/stargraph/generated/test/chat/True": "34388dc0f6b92bbf2003948b0d276d961f951692a22234ce4316376171a2fe65",
    "load/stargraph/generated/train/chat/False": "df2b4aa1a2568f35db669b2676b2086b630d8022221efb700508c1be10507aef",
    "load/stargraph/generated:testbed/train/plain/True": "4b61cb7b4c216ecd5d4a0e813880754c7774ef31d2a471c496d90ce4fb80025b",
    "load/stargraph/generated:testbed/test/plain/True": "ce00d2190a1e651cb23261dda66550b105caf8f510caf9c53cb54923ccf60c91",
    "tagged/stargraph/generated:testbed/chat": "0247a12eabcad9484c5ca44176d6aab95e22fc23eefe02e3cca3913edee141b6",
    "tagged/stargraph/generated/plain": "0c326e77bf774b97135b67dd38fa462ab2f4007f41447088797a5c5e4b377337",
    "score/stargraph/generated:testbed": "ee51874fdc78c3f0c1990f9e06e7ceae833379fe35e94b18cf99bdc1b686d20a",
    "reward/stargraph/generated": "ee51874fdc78c3f0c1990f9e06e7ceae833379fe35e94b18cf99bdc1b686d20a",
    "extract/stargraph/generated": "fd13021f66e622805e41db098ba12e3dfed216a5764a39ef1b5eadb007f04529",
    "format_prompt/stargraph/generated": "484c42ce88bbb0cf4d79c81b165ddbc60a9526599936960fc195660afc1b70f3",
    "build_prompt/stargraph/generated:testbed": "254def0baffd416b5b9aae5fca75197d52cbe14877b983bdf291f122fa9b6df7",
    "validation/stargraph/generated:testbed": "a0237f3e751774c2805aa74ade7bf3a73248778683aedf5078d973e4089450c5",
    "testbed_sft/stargraph": "966e069f1b7fe2f58b4803626dc5679dd556051772cb314071cda0e96ca09045",
    "testbed_test/stargraph": "935f9b65281a59b137d2cad21cfe3f5a05fc8f381a20aa0ca532236c4954f97a",
}


class _Chat:
    chat_template = "t"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "|".join(m["role"] + ":" + m["content"] for m in messages) + "|assistant:"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _trace(name, row):
    if name == "countdown":
        return countdown.search_trace(row["nums"], row["target"])
    if name == "linsys":
        return linsys.solution_trace(row, show_work=True)
    return stargraph.search_trace(row)


def _completions(name, source):
    """Six completions per held-out row: its solution trace, a wrong final answer, a bare tag, no tag, an
    unclosed tag after the answer and an opening tag before everything."""
    rows = get_task(name).load(source, n=24, seed=3, split="test", prompt_format="plain").to_list()
    texts, inst = [], []
    for row in rows:
        t = _trace(name, row)
        for text in (
            t,
            t.replace("</answer>", "0</answer>"),
            "<answer>1</answer>",
            "none",
            t + "<answer>",
            "<answer>" + t,
        ):
            texts.append(text)
            inst.append(row)
    return rows, texts, inst


def compute(key: str):
    """The value pinned under ``key`` (``<kind>/<task>/...``), built with the task interface."""
    kind, name, *rest = key.split("/")
    task = get_task(name)
    if kind == "load":
        source, split, fmt, prefill = rest
        return task.load(
            source, n=24, seed=3, split=split, prompt_format=fmt, prefill=prefill == "True"
        ).to_list()
    if kind == "tagged":
        source, fmt = rest
        return task.load(
            source, n=8, seed=5, split="test", prompt_format=fmt, eviction_rate_tag=TAG
        ).to_list()
    if kind == "testbed_sft":
        return testbed.sft_examples(testbed.TestbedArgs(task=name, num_train=12), "<eos>")
    if kind == "testbed_test":
        args = testbed.TestbedArgs(task=name, num_train=12)
        return [
            [testbed.plain_prompt(args, p), p] for p in testbed.testbed_problems(args, 12, 10_000, "test")
        ]
    (source,) = rest
    if kind == "validation":
        train = task.load(source, n=64, seed=0, split="train", prompt_format="plain")
        return load_validation_problems(name, source, 16, 0, exclude=train, prompt_format="plain")
    rows, texts, inst = _completions(name, source)
    if kind == "score":
        return [[task.score(t, r, format_reward=f) for t, r in zip(texts, inst)] for f in (0.0, 0.1)]
    if kind == "reward":
        chat = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {c: [r[c] for r in inst] for c in task.columns}
        return [
            task.reward_func(prompts=None, completions=chat, **columns, format_reward=f) for f in (0.0, 0.1)
        ]
    if kind == "extract":
        return [task.extract_answer(t) for t in texts]
    if kind == "format_prompt":
        return [
            [
                task.format_prompt(row, tok, eviction_rate_tag=tag, prefill=p)
                for tok in (None, _Chat())
                for tag in (None, TAG)
                for p in (True, False)
            ]
            for row in rows[:6]
        ]
    assert kind == "build_prompt", key
    return [
        task.build_prompt(row, eviction_rate_tag=TAG, prefill=True, system_prompt="sys") for row in rows[:6]
    ]


@pytest.mark.parametrize("key", sorted(DIGESTS))
def test_task_outputs_match_the_pinned_digests(key):
    assert _digest(compute(key)) == DIGESTS[key]


def test_pinned_rows():
    assert get_task("countdown").load(
        "generated:testbed", n=2, split="test", prompt_format="plain"
    ).to_list() == [
        {"prompt": "nums 5 2 8 target 18\n<think>", "nums": [5, 2, 8], "target": 18},
        {"prompt": "nums 7 7 9 target 58\n<think>", "nums": [7, 7, 9], "target": 58},
    ]
    assert get_task("linsys").load(
        "generated:testbed", n=2, split="test", prompt_format="plain"
    ).to_list() == [
        {"prompt": "solve -3x-2y=2; -2x=0\n<think>", "coeffs": [[-3, -2], [-2, 0]], "rhs": [2, 0]},
        {"prompt": "solve -2x-y=11; -4x=20\n<think>", "coeffs": [[-2, -1], [-4, 0]], "rhs": [11, 20]},
    ]
    (row,) = (
        get_task("stargraph").load("generated:testbed", n=1, split="test", prompt_format="plain").to_list()
    )
    edges = [
        [73, 39],
        [55, 45],
        [9, 64],
        [37, 17],
        [97, 92],
        [92, 83],
        [39, 55],
        [64, 47],
        [86, 97],
        [37, 86],
    ]
    edges += [[17, 9], [37, 73]]
    assert row == {
        "prompt": "edges 73>39 55>45 9>64 37>17 97>92 92>83 39>55 64>47 86>97 37>86 17>9 37>73 from 37 to 47\n<think>",
        "edges": edges,
        "source": 37,
        "goal": 47,
    }
    assert get_task("countdown").load("generated", n=1).to_list() == [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": "Using the numbers [94, 10, 88, 43], create an equation that equals 59. You can use "
                    "basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your "
                    "work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
                    "example <answer> (1 + 2) / 3 </answer>.",
                },
                {"role": "assistant", "content": "Let me solve this step by step.\n<think>"},
            ],
            "nums": [94, 10, 88, 43],
            "target": 59,
        }
    ]


def test_pinned_math_prompts_parses_and_rewards(tmp_path):
    math = get_task("math")
    texts = [
        "so \\boxed{\\frac{1}{2}}.",
        "\\boxed{3} then \\boxed{5}",
        "Answer: 42\n",
        "Answer: $17$.",
        "nothing",
        "\\boxed{}",
        "\\boxed{70.0}",
        "\\boxed{204}",
        "Answer: 71",
    ]
    assert [math.extract_answer(t) for t in texts] == [
        "\\frac{1}{2}",
        "5",
        "42",
        "17",
        None,
        None,
        "70.0",
        "204",
        "71",
    ]
    golds = ["0.5", "5", "42", "17", "1", "1", "70", "204", "70"]
    assert math.reward_func(prompts=None, completions=texts, answer=golds) == [1, 1, 1, 1, 0, 0, 1, 1, 0]
    dapo = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nP0\n\nRemember to put "
        'your answer on its own line after "Answer:".'
    )
    (tmp_path / "aime24.jsonl").write_text(
        "".join(
            json.dumps({"id": f"aime24-{i}", "problem": f"P{i}", "answer": str(i), "source": "x"}) + "\n"
            for i in range(3)
        )
    )
    (tmp_path / "set.jsonl").write_text(
        "".join(json.dumps({"problem": f"Q{i}", "answer": str(i)}) + "\n" for i in range(3))
    )
    rows = math.load(split="aime24", data_dir=tmp_path).to_list()
    assert len(rows) == 3 and rows[0] == {
        "prompt": [{"role": "user", "content": dapo}],
        "answer": "0",
        "id": "aime24-0",
    }
    boxed = math.load(str(tmp_path / "set.jsonl"), split="test", style="boxed", n=2).to_list()
    assert boxed == [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": f"Q{i}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
                }
            ],
            "answer": str(i),
            "id": f"set-{i}",
        }
        for i in range(2)
    ]
