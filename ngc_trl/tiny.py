"""Tiny models and tokenizers built locally (no Hub): the offline testbed, the tests and the CPU benchmarks.

`char_tokenizer` builds a character-level `PreTrainedTokenizerFast` (every character one token, plus
special tokens) with a minimal chat template; `tiny_qwen2_config` a small Qwen2 with grouped-query
attention (fewer KV heads than query heads, like DeepSeek-R1-Distill-Qwen-1.5B).
"""

from __future__ import annotations

import string

from transformers import PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DEFAULT_CHARS = string.digits + string.ascii_letters + " \n+-*/=()<>|:;,.?!%_'\"[]{}^#&@~$\\"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def char_tokenizer(chars: str = DEFAULT_CHARS, extra_special: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: ids 0–3 are ``<pad> <bos> <eos> <unk>``, then ``extra_special``
    (e.g. the interoception or meta tokens), then one id per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    extra = list(extra_special or [])
    vocab = {t: i for i, t in enumerate(SPECIALS + extra)}
    for c in dict.fromkeys(chars):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=extra or None, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2_config(vocab_size: int, num_layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 4096, **kw) -> Qwen2Config:
    """A small Qwen2 config with GQA (``heads`` query heads share ``kv_heads`` KV heads)."""
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **kw,
    )
