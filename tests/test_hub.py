"""`ngc_trl.hub` (settings files, model card, safe push) and `ngc_trl.engine.special_tokens`."""

import json

import pytest
import torch
from transformers import Qwen2ForCausalLM

from ngc_trl.engine.config import EvictionConfig
from ngc_trl.engine.special_tokens import add_special_token
from ngc_trl.evaluation.setup import read_ngc_settings
from ngc_trl.hub import (
    SETTINGS_FILE,
    TRAINING_FILE,
    load_ngc_settings,
    safe_push,
    scrub_token,
    write_model_card,
    write_ngc_settings,
)
from ngc_trl.models import char_tokenizer, tiny_qwen2_config


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    tok = char_tokenizer()
    return Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=32, heads=2, kv_heads=1)), tok


def test_settings_and_card_round_trip_through_adapter_folder(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = EvictionConfig(eviction_interval=128, eviction_rate=0.4, block_size=16, score_window=5)
    write_ngc_settings(
        tmp_path,
        cfg,
        {
            "meta_token": "<|gc|>",
            "interoception_rates": None,
            "curriculum": {"rates": [0.1, 0.4]},
            "base_model": "tiny",
        },
    )
    (tmp_path / "README.md").write_text("# TRL card\n")
    write_model_card(
        tmp_path,
        cfg,
        "tiny-base",
        curriculum={"rates": [0.1, 0.4], "stage_steps": 20, "alpha": 0.6},
        meta_token="<|gc|>",
        task="countdown",
        is_adapter=True,
    )
    write_model_card(tmp_path, cfg, "tiny-base", is_adapter=True)  # idempotent: replaces the NGC section

    assert (tmp_path / "adapter_config.json").is_file()
    assert load_ngc_settings(tmp_path) == cfg
    assert load_ngc_settings(str(tmp_path)) == cfg
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings["meta_token"] == "<|gc|>" and "interoception_rates" not in settings
    assert "curriculum" not in settings  # extras that eval's reader would reject go elsewhere
    assert json.loads((tmp_path / TRAINING_FILE).read_text())["curriculum"] == {"rates": [0.1, 0.4]}
    assert read_ngc_settings(tmp_path)["meta_token"] == "<|gc|>"  # ngc-eval reads it
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# TRL card") and card.count("## Neural Garbage Collection") == 1
    assert "| eviction interval δ | 128" in card and "tiny-base" in card and "WITHOUT eviction" in card
    assert "from ngc_trl import generate_with_eviction" in card and "load_ngc_settings" in card
    assert "AutoPeftModelForCausalLM" in card


def test_card_mentions_curriculum_interoception_meta_token(tmp_path):
    from ngc_trl.hub import model_card_text

    cfg = EvictionConfig()
    text = model_card_text(
        cfg,
        "base",
        curriculum={"rates": [0.1, 0.5], "stage_steps": 20, "alpha": 0.6},
        interoception_rates=[0.25, 0.5],
        meta_token="<|gc|>",
        repo_id="org/model",
    )
    for needle in (
        "[0.1, 0.5]",
        "[0.25, 0.5]",
        "`<|gc|>`",
        'load_ngc_settings("org/model")',
        "ε",
        "| block size b | 32",
        "| score window w | 5",
        "`ngc`",
        "forced_token_id",
    ):
        assert needle in text


def test_load_settings_errors_and_hub_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_ngc_settings(tmp_path)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"eviction_interval": 64, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_ngc_settings(tmp_path)
    hub_file = tmp_path / "hub" / SETTINGS_FILE
    write_ngc_settings(hub_file.parent, EvictionConfig(eviction_interval=350))
    calls = []

    def fake_download(repo_id, filename, revision=None, token=None):
        calls.append((repo_id, filename, revision))
        return str(hub_file)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_ngc_settings("org/model", revision="v1").eviction_interval == 350
    assert calls == [("org/model", SETTINGS_FILE, "v1")]


def test_add_special_token_mean_init(tiny):
    model, tok = tiny
    old_vocab = len(tok)
    init_ids = tok("tl;dr", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[init_ids].mean(0).detach().clone()
    tid = add_special_token(model, tok, "<|gc|>", "tl;dr")
    assert tid == old_vocab and len(tok) == old_vocab + 1
    assert tok.tokenize("ab<|gc|>c") == ["a", "b", "<|gc|>", "c"]  # never split
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    torch.testing.assert_close(emb[tid], expected)
    assert add_special_token(model, tok, "<|gc|>", "tl;dr") == tid and len(tok) == old_vocab + 1
    with pytest.raises(ValueError, match="meta_token_init"):
        add_special_token(model, tok, "<|x|>", "")


class _Args:
    output_dir = "/tmp/ngc-run"


class FailingTrainer:
    args = _Args()

    def push_to_hub(self, **kwargs):
        raise OSError("401 Unauthorized for token hf_abcdefghijklmnopqrstuvwxyz123456 and secret-env-token")


class OkTrainer:
    args = _Args()

    def push_to_hub(self, **kwargs):
        return f"https://huggingface.co/org/model/commit/abc ({kwargs['commit_message']})"


def test_safe_push_scrubs_token(monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "secret-env-token")
    with pytest.raises(RuntimeError) as err:
        safe_push(FailingTrainer(), commit_message="end")
    msg = str(err.value)
    assert "hf_abcdef" not in msg and "secret-env-token" not in msg
    assert "push_to_hub failed" in msg and "/tmp/ngc-run" in msg and "401" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert safe_push(FailingTrainer(), raise_on_error=False) is None
    assert "hf_abcdef" not in caplog.text and "secret-env-token" not in caplog.text
    assert "commit/abc (end)" in safe_push(OkTrainer(), commit_message="end")


def test_scrub_token():
    assert scrub_token("a hf_ABCDEF123456 b", None) == "a *** b"
    assert scrub_token("x mytoken y", "mytoken") == "x *** y"
