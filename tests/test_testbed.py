"""The offline testbed end to end at toy scale: SFT a few steps, save, reload, evaluate, write testbed.json."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ngc_trl import testbed
from ngc_trl.tasks import get_task


def test_sft_example_is_prompt_plus_verifying_trace():
    args = testbed.TestbedArgs(num_train=6)
    for ex in testbed.sft_examples(args, "<eos>"):
        assert ex["prompt"] == get_task("countdown").build_plain_prompt(ex)
        assert (
            ex["completion"].startswith("\n")
            and " left " in ex["completion"]
            and ex["completion"].endswith("</answer><eos>")
        )
        assert get_task("countdown").score(ex["completion"], ex) == 1.0
        assert len(ex["prompt"]) < 64  # shorter than the tiny recipes' eviction interval


def test_linsys_testbed_examples_verify_and_its_words_are_single_tokens():
    linsys = get_task("linsys")
    args = testbed.TestbedArgs(task="linsys", num_train=20)
    tok = testbed.build_tokenizer("number", "linsys")
    examples, lengths = testbed.sft_examples(args, "<eos>"), []
    assert len(examples) == 20
    for ex in examples:
        assert ex["prompt"] == linsys.build_plain_prompt(ex)
        assert len(ex["coeffs"]) == 2 and max(abs(c) for row in ex["coeffs"] for c in row) <= 4
        assert linsys.score(ex["completion"], ex) == 1.0
        text = ex["prompt"] + ex["completion"]
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
        lengths.append(len(ids))
    assert sum("*" in ex["completion"] for ex in examples) >= 15  # only a diagonal system needs no arithmetic
    lengths.sort()
    assert (
        lengths[10] >= 100 and lengths[-1] <= 300
    )  # a few eviction intervals of the tiny recipes' delta = 64
    assert (
        len(tok("eliminate")["input_ids"]) == 1
        and len(testbed.build_tokenizer("number")("eliminate")["input_ids"]) > 1
    )
    with pytest.raises(ValueError, match="task"):
        testbed.problem_kwargs(testbed.TestbedArgs(task="sudoku"))


def test_number_tokenizer_is_lossless_and_numbers_are_single_tokens():
    import random

    from ngc_trl.models import DEFAULT_CHARS, number_tokenizer

    tok = number_tokenizer(max_number=1999)
    assert tok.chat_template is None  # plain prompts, as the testbed trains them
    for n in (0, 7, 12, 144, 999, 1000, 1728, 1999):
        assert tok.convert_ids_to_tokens(tok(str(n))["input_ids"]) == [str(n)]
    assert tok.convert_ids_to_tokens(tok("2000 0123 nothing")["input_ids"]) == [
        "200",
        "0",
        " ",
        "0",
        "123",
        " ",
        "no",
        "t",
        "h",
        "i",
        "n",
        "g",
    ]
    ex = testbed.sft_examples(testbed.TestbedArgs(num_train=4), tok.eos_token)[0]
    text = ex["prompt"] + ex["completion"]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < 0.7 * len(text)
    assert "<think>" in tok.convert_ids_to_tokens(ids) and tok.unk_token_id not in ids
    rng = random.Random(0)
    for _ in range(300):  # arbitrary strings over the alphabet round-trip exactly
        s = "".join(rng.choice(DEFAULT_CHARS) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok(s)["input_ids"]) == s


def test_prefixed_number_tokens_make_an_edge_lookup_one_induction_step():
    import random

    from ngc_trl.models import DEFAULT_CHARS, number_tokenizer
    from ngc_trl.tasks import stargraph

    tok = number_tokenizer(prefixes=" >", max_prefixed=99)
    assert len(tok) == len(number_tokenizer()) + 200
    pieces = tok.convert_ids_to_tokens(tok("edges 62>51 27>64 from 5 to 74 123>100")["input_ids"])
    assert pieces == [
        "edges",
        " 62",
        ">51",
        " 27",
        ">64",
        " ",
        "from",
        " 5",
        " ",
        "to",
        " 74",
        " ",
        "123",
        ">",
        "100",
    ]
    p = stargraph.generate_problems(1, 0, split="train", **stargraph.DISTRIBUTIONS["testbed"])[0]
    prompt, trace = (
        stargraph.TASK.build_plain_prompt(p),
        stargraph.search_trace(p),
    )
    prompt_toks, trace_toks = (tok.convert_ids_to_tokens(tok(x)["input_ids"]) for x in (prompt, trace))
    for i, t in enumerate(trace_toks[:-1]):  # every next node of a walk follows its node in the prompt
        if t.startswith(" ") and trace_toks[i + 1].startswith(">") and t[1:].isdigit() and i > 2:
            assert trace_toks[i + 1] in {prompt_toks[j + 1] for j, u in enumerate(prompt_toks[:-1]) if u == t}
    rng = random.Random(0)
    for _ in range(300):
        s = "".join(rng.choice(DEFAULT_CHARS) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok(s)["input_ids"]) == s
    with pytest.raises(ValueError, match="prefixes"):
        number_tokenizer(prefixes="1")


def test_digit_initialised_number_embeddings_share_place_values():
    from transformers import Qwen2ForCausalLM

    from ngc_trl.models import number_tokenizer, tiny_qwen2_config

    tok = number_tokenizer(max_number=199)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=1, hidden=64))
    testbed.init_number_embeddings(model, tok, "digits")
    emb, v = model.get_input_embeddings().weight, tok.get_vocab()

    def cos(a, b):
        return torch.cosine_similarity(emb[v[a]], emb[v[b]], dim=0).item()

    assert cos("84", "87") > 0.3 > abs(cos("84", "31"))  # shared tens digit vs. nothing shared
    sep = number_tokenizer(max_number=199, prefixes=" >", max_prefixed=99)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(sep), num_layers=1, hidden=64))
    testbed.init_number_embeddings(model, sep, "digits")
    emb, v = model.get_input_embeddings().weight, sep.get_vocab()
    assert cos(" 84", ">84") > 0.3 and cos(" 84", " 87") > cos(" 84", ">31")  # same number / same prefix
    with pytest.raises(ValueError, match="number_init"):
        testbed.init_number_embeddings(model, tok, "fancy")


def test_testbed_end_to_end(tmp_path):
    out = tmp_path / "base"
    testbed.main(
        [
            "--output_dir",
            str(out),
            "--num_train",
            "16",
            "--max_steps",
            "2",
            "--batch_size",
            "8",
            "--num_test",
            "8",
            "--max_new_tokens",
            "32",
            "--num_layers",
            "2",
            "--hidden",
            "64",
            "--logging_steps",
            "1",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = tok("nums 3 5 target 8\n<think>", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    result = json.loads((out / "testbed.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 8
    assert result["train"]["steps"] == 2 and not (out / "_trainer").exists()
    assert result["settings"]["distribution"]["num_range"] == [1, 12]


def test_saved_local_tokenizers_load_back_unchanged_beside_a_qwen2_config(tmp_path):
    """transformers maps a qwen2 folder to Qwen2Tokenizer, whose byte-level pre-tokenizer would split our
    word-level / character tokens: `load_tokenizer` (used by train, eval and the testbed) must not."""
    from transformers import Qwen2ForCausalLM

    from ngc_trl.models import char_tokenizer, load_tokenizer, number_tokenizer, tiny_qwen2_config

    text = "nums 11 9 5 target 46\n<think>\n11+9=20 left 5 20\n</think>\n<answer>(11+9)*5</answer>"
    for name, tok in (("number", number_tokenizer()), ("char", char_tokenizer())):
        folder = tmp_path / name
        Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=1, hidden=32)).save_pretrained(folder)
        tok.save_pretrained(folder)
        back = load_tokenizer(str(folder))
        assert back(text)["input_ids"] == tok(text)["input_ids"], name
        assert back.decode(back(text)["input_ids"]) == text


def test_testbed_tokenizer_ids_do_not_depend_on_the_hash_seed():
    """The same command must build the same base in every process: token ids (and so the digit-initialised
    embeddings and every trained weight) may not follow Python's per-process string-hash order."""
    import os
    import subprocess
    import sys

    pairs = [
        ("number", "countdown"),
        ("number_sep", "stargraph"),
        ("number", "linsys"),
        ("char", "countdown"),
    ]
    code = (
        "import json; from ngc_trl.testbed import build_tokenizer; "
        f"print(json.dumps([sorted(build_tokenizer(k, t).get_vocab().items()) for k, t in {pairs!r}]))"
    )
    vocabs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert vocabs[0] and vocabs[0] == vocabs[1]
