"""Beacon SFT (the Breadcrumbs student's warm start): the batch split, the loss under the beacon mask
against independent references, a training step, the testbed's warm-start mode and a BreadcrumbsTrainer
whose student starts from the warm start."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
from trl import SFTConfig

from ngc_trl import testbed
from ngc_trl.breadcrumbs.beacons import add_beacon_token, beacon_layout, beacon_logprobs
from ngc_trl.breadcrumbs.warm_start import BeaconSFTTrainer, split_prompt_completion
from ngc_trl.engine.config import BeaconConfig
from ngc_trl.hub import load_ngc_settings
from ngc_trl.models import char_tokenizer, tiny_qwen2_config

ROWS = [
    ("nums 3 5 target 8\n", "3+5=8 yes\n<answer>3+5</answer>"),
    ("ab\n", "xyz 12345 qq"),
    ("nums 1 2 3 target 7\n", "1+2=3 left 3 3\n3+3=6 no\nback"),
]


def beacon_model():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    return model, tok, add_beacon_token(tok, model)


def make_trainer(tmp_path, model, tok, beacon, ratios, **kw):
    kw = dict(per_device_train_batch_size=3, max_steps=1, logging_steps=1, learning_rate=1e-2) | kw
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        completion_only_loss=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **kw,
    )
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in ROWS])
    return BeaconSFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        beacon_token_id=beacon,
        compression_ratios=ratios,
    )


def collated(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_split_prompt_completion_pads_prompts_left_and_completions_right():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, -100], [-100, -100, -100, 4, -100, -100]])
    p, pm, c, cm = split_prompt_completion(ids, att, labels, pad_token_id=0)
    assert p.tolist() == [[0, 5, 6], [1, 2, 3]] and pm.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert c.tolist() == [[7, 8, 9], [4, 0, 0]] and cm.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_loss_without_a_beacon_is_the_plain_completion_loss(tmp_path):
    """c longer than every completion: no beacon is fed, so the loss is the model's own completion-only CE."""
    model, tok, beacon = beacon_model()
    tr = make_trainer(tmp_path, model, tok, beacon, [64])
    batch = collated(tr)
    model.eval()
    got = tr.compute_loss(model, dict(batch))
    ref = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_loss_with_beacons_is_the_beacon_masked_nll_of_the_raw_rows(tmp_path):
    """c = 2: the loss equals the mean NLL under the beacon layout built from the rows tokenised apart
    (so the collated batch was split correctly), and differs from the plain loss (beacons matter)."""
    model, tok, beacon = beacon_model()
    tr = make_trainer(tmp_path, model, tok, beacon, [2])
    batch = collated(tr)
    model.eval()
    got = tr.compute_loss(model, dict(batch))
    total, count = 0.0, 0
    for prompt, completion in ROWS:
        pid = tok(prompt, return_tensors="pt")["input_ids"]
        cid = tok(completion + tok.eos_token, return_tensors="pt")["input_ids"]
        layout = beacon_layout(pid, torch.ones_like(pid), cid, torch.ones_like(cid), 2, beacon)
        with torch.no_grad():
            total += -beacon_logprobs(model, layout).sum().item()
        count += cid.shape[1]
    torch.testing.assert_close(got.item(), total / count, rtol=1e-5, atol=1e-6)
    plain = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    assert abs(got.item() - plain.item()) > 1e-3


def test_a_training_step_lowers_the_beacon_loss_and_trains_the_beacon_row(tmp_path):
    model, tok, beacon = beacon_model()
    tr = make_trainer(tmp_path, model, tok, beacon, [2, 4], max_steps=5)
    before = tr.compute_loss(model, dict(collated(tr))).item()
    row0 = model.get_input_embeddings().weight[beacon].detach().clone()
    tr.train()
    model.eval()
    after = tr.compute_loss(model, dict(collated(tr))).item()
    assert after < before
    assert not torch.equal(model.get_input_embeddings().weight[beacon], row0)
    ratios = [v for h in tr.state.log_history for k, v in h.items() if k == "beacon_sft/compression_ratio"]
    assert ratios and all(2 <= r <= 4 for r in ratios)


def test_packing_is_refused(tmp_path):
    model, tok, beacon = beacon_model()
    with pytest.raises(ValueError, match="packing"):
        make_trainer(tmp_path, model, tok, beacon, [2], packing=True)
    with pytest.raises(ValueError, match="compression_ratios"):
        make_trainer(tmp_path, model, tok, beacon, [1])


TINY = [
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


def test_testbed_warm_starts_a_beacon_student(tmp_path):
    base, student = tmp_path / "base", tmp_path / "student"
    testbed.main(["--output_dir", str(base), *TINY])
    result = testbed.main(
        ["--output_dir", str(student), "--init_from", str(base), "--beacon_ratios", "2,4", *TINY]
    )
    assert (
        set(result["by_compression_ratio"]) == {"2", "4"}
        and result["settings"]["eval_policy"] == "breadcrumbs"
    )
    assert result["train"]["steps"] == 2
    settings = load_ngc_settings(student)
    assert isinstance(settings, BeaconConfig) and settings.compression_ratio == 2
    training = json.loads((student / "ngc_training.json").read_text())
    assert training["warm_start"] == "beacon_sft" and training["dataset_source"] == "generated:testbed"
    grown = AutoModelForCausalLM.from_pretrained(student).get_input_embeddings().weight.shape[0]
    assert grown == AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.shape[0] + 1


def test_testbed_rejects_bad_ratios_before_training(tmp_path):
    with pytest.raises(ValueError, match="beacon_ratios"):
        testbed.main(["--output_dir", str(tmp_path / "x"), "--beacon_ratios", "4,1", *TINY])
    assert not (tmp_path / "x" / "testbed.json").exists()


# ----------------------------------------------------------------------------- BreadcrumbsTrainer from a warm start
def _breadcrumbs(tmp_path, model, tok, peft=None, **kw):
    from peft import LoraConfig

    from ngc_trl import BreadcrumbsConfig, BreadcrumbsTrainer

    args = BreadcrumbsConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=16,
        compression_ratio=4,
        learning_rate=1e-2,
        max_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        **kw,
    )
    return BreadcrumbsTrainer(
        model=model,
        reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [p for p, _ in ROWS] * 2}),
        processing_class=tok,
        peft_config=LoraConfig(r=2, target_modules=["q_proj"]) if peft else None,
    )


def test_breadcrumbs_student_starts_from_the_warm_start(tmp_path):
    warm, tok_w, _ = beacon_model()
    with torch.no_grad():
        for p in warm.parameters():
            p.add_(0.01)
    warm.save_pretrained(tmp_path / "warm")
    tok_w.save_pretrained(tmp_path / "warm")
    tok = char_tokenizer()  # the teacher's tokenizer has no beacon yet: the trainer adds it at the same id
    teacher = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64, initializer_range=0.2))
    tr = _breadcrumbs(tmp_path, teacher, tok, student_model_name_or_path=str(tmp_path / "warm"))
    for (n, a), b in zip(tr.student_model.state_dict().items(), warm.state_dict().values()):
        assert torch.equal(a, b), n
    tr.train()  # one joint step runs from the warm start
    assert tr.state.global_step == 1


def test_breadcrumbs_warm_start_must_share_the_vocabulary(tmp_path):
    other = char_tokenizer(chars="abc\n ")
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(other), num_layers=2, hidden=64))
    add_beacon_token(other, model)
    model.save_pretrained(tmp_path / "warm")
    other.save_pretrained(tmp_path / "warm")
    tok = char_tokenizer()
    teacher = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64))
    with pytest.raises(ValueError, match="student_model_name_or_path"):
        _breadcrumbs(tmp_path, teacher, tok, student_model_name_or_path=str(tmp_path / "warm"))
    with pytest.raises(ValueError, match="student_model_name_or_path needs full fine-tuning"):
        _breadcrumbs(
            tmp_path,
            Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64)),
            char_tokenizer(),
            peft=True,
            student_model_name_or_path=str(tmp_path / "warm"),
        )
