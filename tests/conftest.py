"""Shared fixtures: tiny random Qwen2 models (GQA: 4 query heads, 2 KV heads) built from a config, a saved
tiny base folder for the entry-point tests, and a guard that fails if a model is loaded."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def bench_module(name: str):
    """Import ``bench/<name>.py`` (the benchmarks are scripts, not a package; ``bench/`` goes on the path so
    they can import each other)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (and pickling) look the module up by name
    spec.loader.exec_module(module)
    return module


def tiny_qwen2(num_layers=3, vocab=96, hidden=64, heads=4, kv_heads=2, seed=0, dtype=torch.float32):
    """A random Qwen2 with GQA. ``initializer_range=0.2`` gives diverse, well-separated greedy tokens
    (the default 0.02 makes a random model repeat one token, which would hide eviction effects)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def eval_one_thread():
    """For modules that call `ngc_trl.evaluation.run.evaluate`: one intra-op thread (tiny matmuls on a shared 2-core box
    cost more in threading than they save), and no accelerate state left behind for other modules."""
    from accelerate import PartialState

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    PartialState._reset_state()


@pytest.fixture(scope="session")
def model():
    return tiny_qwen2()


def left_padded(lengths, vocab=96, seed=0, pad=0):
    """A left-padded batch of random prompts of the given lengths (ids avoid pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.full((len(lengths), p), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), p, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, p - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, p - n :] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny Qwen2 + char tokenizer saved with save_pretrained (what `ngc-testbed` writes to outputs/tiny-base)."""
    from ngc_trl.models import char_tokenizer, tiny_qwen2_config

    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tok), num_layers=2, hidden=64))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model or tokenizer is loaded (config errors must come first)."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
