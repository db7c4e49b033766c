"""Shared fixtures: tiny random Qwen2 models (GQA: 4 query heads, 2 KV heads) built from a config."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2(num_layers=3, vocab=96, hidden=64, heads=4, kv_heads=2, seed=0, dtype=torch.float32):
    """A random Qwen2 with GQA. ``initializer_range=0.2`` gives diverse, well-separated greedy tokens
    (the default 0.02 makes a random model repeat one token, which would hide eviction effects)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


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
        ids[i, p - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, p - n:] = 1
    return ids, mask
