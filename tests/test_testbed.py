"""The offline testbed end to end at toy scale: SFT a few steps, save, reload, evaluate, write testbed.json."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ngc_trl import testbed
from ngc_trl.tasks.countdown import build_plain_prompt, score


def test_sft_example_is_prompt_plus_verifying_trace():
    args = testbed.TestbedArgs(num_train=6)
    for ex in testbed.sft_examples(args, "<eos>"):
        assert ex["prompt"] == build_plain_prompt(ex["nums"], ex["target"])
        assert ex["completion"].startswith("\n") and " left " in ex["completion"] and ex["completion"].endswith("</answer><eos>")
        assert score(ex["completion"], ex["nums"], ex["target"]) == 1.0
        assert len(ex["prompt"]) < 128  # shorter than the tiny recipes' eviction interval


def test_testbed_end_to_end(tmp_path):
    out = tmp_path / "base"
    testbed.main(["--output_dir", str(out), "--num_train", "16", "--max_steps", "2", "--batch_size", "8",
          "--num_test", "8", "--max_new_tokens", "32", "--num_layers", "2", "--hidden", "64",
          "--logging_steps", "1"])
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = tok("nums 3 5 target 8\n<think>", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    result = json.loads((out / "testbed.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 8
    assert result["train"]["steps"] == 2 and not (out / "_trainer").exists()
    assert result["settings"]["distribution"]["num_range"] == [1, 12]
