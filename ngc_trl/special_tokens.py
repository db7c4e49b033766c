"""Adding the NGC meta-token (paper §A.4) to a tokenizer and a model.

The meta-token is an ordinary vocabulary entry forced just before every eviction round. Its embedding
is initialised to the mean of the embeddings of the tokens of a short text (the paper: ``"tl;dr"``).
"""

from __future__ import annotations

import torch


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
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    new_size = max(len(tokenizer), token_id + 1)
    if model.get_input_embeddings().weight.shape[0] < new_size:
        model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[token_id] = emb[init_ids].float().mean(0).to(emb.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[token_id] = head.weight[init_ids].float().mean(0).to(head.weight.dtype)
    return token_id
