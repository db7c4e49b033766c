"""Tiny models and tokenizers built locally (no Hub): the offline testbed, the tests and the CPU benchmarks.

`char_tokenizer` builds a character-level `PreTrainedTokenizerFast` (every character one token, plus
special tokens) with a minimal chat template; `number_tokenizer` a lossless word-level one in which every
integer 0..``max_number`` and a few task words are single tokens (the testbed's default: copying a number
is one token, an arithmetic step a lookup); `tiny_qwen2_config` a small Qwen2 with grouped-query
attention (fewer KV heads than query heads, like DeepSeek-R1-Distill-Qwen-1.5B).
"""

from __future__ import annotations

import re
import string

from transformers import PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DEFAULT_CHARS = string.digits + string.ascii_letters + " \n+-*/=()<>|:;,.?!%_'\"[]{}^#&@~$\\"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def char_tokenizer(
    chars: str = DEFAULT_CHARS, extra_special: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: ids 0–3 are ``<pad> <bos> <eos> <unk>``, then ``extra_special``
    (e.g. the interoception or meta tokens), then one id per character."""
    from tokenizers import pre_tokenizers

    extra = list(extra_special or [])
    fast = _word_level(
        SPECIALS + extra + list(chars), pre_tokenizers.Split(pattern="", behavior="isolated"), extra
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _word_level(tokens: list[str], pre_tokenizer, extra_special: list[str]) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over a WordLevel vocabulary (ids in order of first appearance in
    ``tokens``, which start with :data:`SPECIALS`), the given pre-tokenizer and a concatenating decoder."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=extra_special or None,
        padding_side="left",
    )


# words of the Countdown and StarGraph plain prompts and traces (ngc_trl.tasks), longest first in the regex
TRACE_WORDS = ["target", "found", "left", "back", "nums", "yes", "no", "edges", "from", "to", "goal", "start"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def number_tokenizer(
    max_number: int = 1999,
    words: list[str] | None = None,
    chars: str = DEFAULT_CHARS,
    extra_special: list[str] | None = None,
    prefixes: str = "",
    max_prefixed: int = 99,
) -> PreTrainedTokenizerFast:
    """A lossless word-level fast tokenizer for the tiny testbed: ids 0-3 are ``<pad> <bos> <eos> <unk>``,
    then ``extra_special``, the tags ``<think> </think> <answer> </answer>``, every integer ``0..max_number``,
    ``words`` (default :data:`TRACE_WORDS`), the prefixed numbers and finally one id per character of ``chars``.

    Pre-tokenization is one regex: a tag, a listed word, a prefixed number, the longest number prefix that
    is ``<= max_number`` (``"12345"`` -> ``"1234" "5"`` for 1999), else a single character, so every string
    round-trips through ``decode(encode(s))`` exactly as with :func:`char_tokenizer`. It has no chat
    template (plain prompts). A search-trace step ``12*7=84`` is 5 tokens instead of 7 characters, and
    copying a number from the prompt is one token.

    ``prefixes`` (e.g. ``" >"``): every character ``p`` of it joined to every whole number ``n <=
    max_prefixed`` is one token ``p + str(n)`` (``" 27"``, ``">64"``; ``" 123"`` stays ``" " "123"``). With
    them a StarGraph edge lookup is one induction step: in ``"... 27>64 ..."`` the token after ``" 27"`` is
    ``">64"``, where with bare numbers the node after ``27`` is two tokens away.
    """
    from tokenizers import Regex, pre_tokenizers

    if max_number < 9:
        raise ValueError(f"max_number must be >= 9, got {max_number}")
    if not 0 <= max_prefixed <= max_number or any(ch.isdigit() for ch in prefixes):
        raise ValueError(
            f"prefixes={prefixes!r} must not hold digits and 0 <= max_prefixed <= max_number, "
            f"got {max_prefixed}"
        )
    # longest first (the regex tries them in order), ties by spelling: set order depends on PYTHONHASHSEED,
    # and token ids must not, or the same command builds a different base in every process
    words = sorted(set(words if words is not None else TRACE_WORDS), key=lambda w: (-len(w), w))
    extra = list(extra_special or [])
    prefixes = "".join(dict.fromkeys(prefixes))
    prefixed = [p + str(n) for p in prefixes for n in range(max_prefixed + 1)]
    tokens = (
        SPECIALS
        + extra
        + TAG_TOKENS
        + [str(n) for n in range(max_number + 1)]
        + words
        + prefixed
        + list(chars)
    )
    prefix_rx = [f"[{re.escape(prefixes)}]{_number_regex(max_prefixed)}(?![0-9])"] if prefixes else []
    pattern = "|".join(
        [re.escape(t) for t in TAG_TOKENS]
        + [re.escape(w) for w in words]
        + prefix_rx
        + [_number_regex(max_number), r"[\s\S]"]
    )
    # no chat template: the testbed's prompts are plain text, and `ngc-eval --prompt_format auto` then
    # renders them as the model was trained
    return _word_level(tokens, pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated"), extra)


def _number_regex(max_number: int) -> str:
    """A regex alternation matching, at a position, the longest digit string whose value is ``<= max_number``
    (no leading zeros except ``"0"`` itself), so a longer digit run splits into in-vocabulary pieces."""
    alts, top = [], str(max_number)
    for length in range(len(top), 0, -1):
        if length < len(top):
            alts.append("[1-9]" + r"\d" * (length - 1) if length > 1 else "[1-9]")
            continue
        # same length as max_number: digit-by-digit bound
        for i, ch in enumerate(top):
            if int(ch) > (1 if i == 0 else 0):
                lo = "1" if i == 0 else "0"
                alts.append(re.escape(top[:i]) + f"[{lo}-{int(ch) - 1}]" + r"\d" * (len(top) - i - 1))
        alts.append(re.escape(top))
    return "(?:" + "|".join(alts) + "|0)"


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(name_or_path, **kwargs):
    """``AutoTokenizer.from_pretrained``, except for a local folder whose ``tokenizer_config.json`` declares
    the generic fast backend (``TokenizersBackend`` / ``PreTrainedTokenizerFast``: a tokenizer built from a
    ``tokenizers.Tokenizer``, like :func:`number_tokenizer` and :func:`char_tokenizer`), which is loaded
    as exactly that from its ``tokenizer.json``.

    Why: transformers 5.23 maps every ``model_type: qwen2`` folder to ``Qwen2Tokenizer``
    (``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), which replaces the saved pre-tokenizer with Qwen2's
    byte-level BPE one: a word-level or character tokenizer then splits ``"nums 11"`` into
    ``n u m s 1 1`` and loses spaces, silently. Hub ids and every other folder go to ``AutoTokenizer``.
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    config = Path(str(name_or_path)).expanduser() / "tokenizer_config.json"
    if config.is_file() and (config.parent / "tokenizer.json").is_file():
        try:
            declared = json.loads(config.read_text()).get("tokenizer_class")
        except ValueError:
            declared = None
        if declared in GENERIC_TOKENIZER_CLASSES:
            kwargs.pop("trust_remote_code", None)
            return PreTrainedTokenizerFast.from_pretrained(str(config.parent), **kwargs)
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def tiny_qwen2_config(
    vocab_size: int,
    num_layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 4096,
    **kw,
) -> Qwen2Config:
    """A small Qwen2 config with GQA (``heads`` query heads share ``kv_heads`` KV heads)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )
