"""Adding special tokens to a tokenizer and a model: the NGC meta-token (paper §A.4) and, through
`ngc_trl.breadcrumbs.beacons.add_beacon_token`, the Breadcrumbs beacon.

The meta-token is an ordinary vocabulary entry forced just before every eviction round. Its embedding
is initialised to the mean of the embeddings of the tokens of a short text (the paper: ``"tl;dr"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def add_token_to_tokenizer(tokenizer, token: str) -> tuple[int, bool]:
    """Add ``token`` as an additional special token (kept whole, never split) unless it exists.

    Returns ``(id, added)``: ``added`` is False when the tokenizer already had it (nothing changed).
    """
    if token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token), False
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(token), True


def init_token_row(model, token_id: int, vocab_size: int, row: Callable[[torch.Tensor, int], torch.Tensor]):
    """Grow ``model``'s embeddings to ``max(vocab_size, token_id + 1)`` rows if needed, then set row
    ``token_id`` of the input embedding (and of the output head when it is not tied) to
    ``row(weight, n_old)``: ``weight (V, d)`` the matrix, ``n_old`` the rows that existed before and
    precede ``token_id`` (``min(token_id, rows before resizing)``); returns a ``(d,)`` vector."""
    n_old = min(token_id, model.get_input_embeddings().weight.shape[0])
    new_size = max(vocab_size, token_id + 1)
    if model.get_input_embeddings().weight.shape[0] < new_size:
        model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[token_id] = row(emb, n_old).to(emb.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[token_id] = row(head.weight, n_old).to(head.weight.dtype)


def add_special_token(model, tokenizer, token: str, init_text: str = "tl;dr") -> int:
    """Add ``token`` as a special token, resize the embeddings and initialise its row.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The causal LM (not yet wrapped by PEFT). Its input embeddings (and untied output head, if any)
        are resized to ``len(tokenizer)``.
    tokenizer : transformers.PreTrainedTokenizerBase
        Gets ``token`` as an additional special token (kept whole, never split).
    token : str
        The new token, e.g. ``"<|gc|>"``.
    init_text : str
        Text whose tokens' mean embedding initialises the new row (input embedding and, when untied,
        the output head row too).

    Returns
    -------
    int
        The id of ``token``. If the tokenizer already has it, nothing is changed and its id is returned.

    Raises
    ------
    ValueError
        If ``init_text`` tokenizes to nothing.
    """
    if token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    init_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    if not init_ids:
        raise ValueError(f"meta_token_init={init_text!r}: tokenizes to no tokens")
    token_id, _ = add_token_to_tokenizer(tokenizer, token)
    init_token_row(model, token_id, len(tokenizer), lambda w, n_old: w[init_ids].float().mean(0))
    return token_id
