"""Breadcrumbs beacons (Monea et al., arXiv 2510.13797; docs/method.md §8): the beacon token, the layout of a
sequence with its beacons interleaved, and the one-pass training forward under the beacon mask.

Decoding is `ngc_trl.engine.generation.generate_with_eviction` with ``BeaconConfig(compression_ratio=c,
beacon_token_id=b)`` (`ngc_trl.engine.schedule.BeaconWindows`). Training (the compressing student's forward)::

    b = add_beacon_token(tokenizer, model)                       # before PEFT wrapping
    layout = beacon_layout(prompt_ids, prompt_mask, completion_ids, completion_mask, c, b)
    logits = beacon_forward(model, layout)                       # (B, T, V): logits[:, t] predicts completion_ids[:, t]

Conventions, shared by the decode loop and the layout (1-indexed completion tokens ``t_1..t_n``, window
``k = t_{kc+1}..t_{(k+1)c}``, ``k ≥ 0``):

* Beacon ``k`` is fed right after ``t_{(k+1)c}``, and only if ``t_{(k+1)c+1}`` is fed too, i.e. is not the
  row's last completion token (the rollout never feeds its last token: it ends at EOS or at
  ``max_new_tokens``). A row of ``n`` tokens thus holds ``max(n − 2, 0) // c`` beacons. (Inserting one
  before the last token as well would change no logit that is used.)
* Visibility: a token of window ``k`` sees the prompt, beacons ``< k`` and the earlier tokens of window
  ``k``; beacon ``k`` sees the prompt, beacons ``< k``, all of window ``k`` and itself. As a death time:
  key ``j`` is seen by query ``q`` iff ``valid_j and j ≤ q and q < death_j``, with ``death`` of window
  ``k``'s tokens the slot right after beacon ``k`` (never, for a final window without beacon; so when
  the row ends with ``t_{(k+1)c+1}`` and beacon ``k`` is not fed, that last token sees window ``k``: its
  logits are never used).
* Positions: a beacon takes the next position (no re-assignment; docs/method.md §8 "Choices").
* Beacon logits carry no loss: the logits that predict the first token after a beacon are those of
  the window's last token (the rollout samples it before feeding the beacon).
* Not in the paper: ``c`` may differ per row (a ``(B,)`` tensor), in decoding and in the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ngc_trl.engine.attention import no_mask, use_ngc_attention
from ngc_trl.engine.replay import NEVER, ReplayContext
from ngc_trl.engine.special_tokens import add_token_to_tokenizer, init_token_row

BEACON_TOKEN = "<|beacon|>"
BEACON_INITS = ("mean", "eos", "random")


def add_beacon_token(tokenizer, model=None, token: str = BEACON_TOKEN, init: str = "mean") -> int:
    """Add the beacon as a special token, grow ``model``'s embeddings and initialise its row.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Gets ``token`` as an additional special token (kept whole, never split).
    model : transformers.PreTrainedModel, optional
        The causal LM, *before* PEFT wrapping. Its input embeddings (and untied output head) are grown
        to hold the id when needed, and the row is initialised. With LoRA the new row is trained only
        if the embeddings are trainable (``modules_to_save`` / ``trainable_token_indices``).
    token : str
        The beacon's text.
    init : str
        The paper does not say (docs/method.md §8 "Choices"). ``"mean"``: mean of the rows of the tokens that
        precede the new id (ids ``0 .. min(id, old rows) − 1``, so a padded, never-trained tail of a
        vocabulary matrix is excluded); ``"eos"``: a copy of the EOS row; ``"random"``:
        ``N(0, σ²)`` per coordinate from the global RNG, σ the std of those existing rows. The untied
        output head row, if any, gets the same rule applied to the head matrix.

    Returns
    -------
    int
        The beacon id. Idempotent: the row is initialised only by the call that adds the token to the
        tokenizer or grows the embeddings to hold it; later calls change nothing and return the same id.
        (Call it with the model the first time: a tokenizer that already has the token is trusted.)
    """
    if init not in BEACON_INITS:
        raise ValueError(f"init={init!r}: must be one of {BEACON_INITS}")
    if init == "eos" and tokenizer.eos_token_id is None:
        raise ValueError("init='eos': the tokenizer has no eos_token_id")
    token_id, added = add_token_to_tokenizer(tokenizer, token)
    if model is not None and (added or model.get_input_embeddings().weight.shape[0] <= token_id):
        init_token_row(model, token_id, len(tokenizer), partial(_beacon_row, init, tokenizer.eos_token_id))
    return token_id


def _beacon_row(init, eos_id, weight, n_old):
    if init == "eos":
        return weight[eos_id].float()
    ref = weight[:n_old]
    if init == "mean":
        return ref.mean(0, dtype=torch.float32)
    return torch.randn(weight.shape[1], device=weight.device) * ref.float().std()


@dataclass
class BeaconLayout:
    """A batch of prompt + completion with its beacons interleaved where the rollout fed them.

    ``S = P + T + max_b(beacons_b)``. Rows: left padding, prompt, completion with beacons, right padding.

    Attributes:
        input_ids: ``(B, S)`` long (padding slots hold the inputs' padding, or 0).
        attention_mask: ``(B, S)`` long, 1 on valid slots.
        position_ids: ``(B, S)`` long, ``cumsum(attention_mask) − 1`` (beacons take the next position).
        death: ``(B, S)`` long, the first query slot that no longer sees this slot (`NEVER` if none).
        is_beacon: ``(B, S)`` bool.
        completion_index: ``(B, T)`` long, the slot whose logits predict completion token ``t`` (the last
            prompt slot for ``t = 0``; after a beacon, the window's last token, not the beacon).
        completion_ids, completion_mask: ``(B, T)`` the completions as given (for `beacon_logprobs`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    death: torch.Tensor
    is_beacon: torch.Tensor
    completion_index: torch.Tensor
    completion_ids: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None

    def visible(self) -> torch.Tensor:
        """``(B, S, S)`` bool: query ``q`` sees key ``j`` iff ``valid_j and j ≤ q and q < death_j`` (dense;
        for tests and inspection; rows of padding queries are meaningless)."""
        s = self.input_ids.shape[1]
        slot = torch.arange(s, device=self.input_ids.device)
        causal = slot[None, :] <= slot[:, None]
        alive = slot[None, :, None] < self.death[:, None, :]
        return self.attention_mask.bool()[:, None, :] & causal[None] & alive


def beacon_layout(
    prompt_ids, prompt_mask, completion_ids, completion_mask, compression_ratio, beacon_token_id: int
) -> BeaconLayout:
    """Interleave beacons into left-padded prompts + right-padded completions, as the rollout fed them.

    Parameters
    ----------
    prompt_ids, prompt_mask : ``(B, P)`` left-padded prompts.
    completion_ids, completion_mask : ``(B, T)`` right-padded completions (EOS included, then padding);
        a row's length ``n`` is ``completion_mask.sum()``.
    compression_ratio : int or ``(B,)`` long tensor, each ``>= 2``.
    beacon_token_id : the beacon's id.

    Returns
    -------
    `BeaconLayout`. Beacon ``k`` (0-indexed) of a row follows completion token ``(k + 1)c`` (1-indexed)
    when ``(k + 1)c + 1 < n``; see the module docstring.
    """
    device = completion_ids.device
    bsz, p = prompt_ids.shape
    t = completion_ids.shape[1]
    c = torch.as_tensor(compression_ratio, device=device).long().expand(bsz)
    if (c < 2).any():
        raise ValueError(f"compression_ratio={compression_ratio!r}: every ratio must be an integer >= 2")
    n = completion_mask.long().sum(1)
    nb = (n - 2).clamp(min=0) // c  # beacons of each row
    max_nb = int(nb.max()) if bsz else 0
    s = p + t + max_nb

    ar_t = torch.arange(t, device=device)[None]
    comp_slot = p + ar_t + torch.minimum(ar_t // c[:, None], nb[:, None])  # (B, T)
    k = torch.arange(max_nb, device=device)[None]
    has_beacon = k < nb[:, None]
    beacon_slot = torch.where(has_beacon, p + (k + 1) * (c[:, None] + 1) - 1, s)  # s: a dump column

    def place(prompt_part, comp_part, beacon_part, fill):
        out = torch.full((bsz, s + 1), fill, dtype=comp_part.dtype, device=device)
        out[:, :p] = prompt_part
        out.scatter_(1, comp_slot, comp_part)
        out.scatter_(1, beacon_slot, beacon_part)
        return out[:, :s]

    ids = place(prompt_ids.long(), completion_ids.long(), torch.full_like(beacon_slot, beacon_token_id), 0)
    valid = place(prompt_mask.bool(), completion_mask.bool(), has_beacon, False)
    is_beacon = place(
        torch.zeros_like(prompt_mask, dtype=torch.bool),
        torch.zeros_like(completion_mask, dtype=torch.bool),
        has_beacon,
        False,
    )
    window = ar_t // c[:, None]  # window of each completion token; beacon `window` closes it
    death_comp = torch.where(
        (window < nb[:, None]) & (ar_t < n[:, None]), p + (window + 1) * (c[:, None] + 1), NEVER
    )
    death = place(
        torch.full_like(prompt_ids, NEVER, dtype=torch.long),
        death_comp,
        torch.full_like(beacon_slot, NEVER),
        NEVER,
    )
    completion_index = torch.cat([torch.full((bsz, min(t, 1)), p - 1, device=device), comp_slot[:, :-1]], 1)
    return BeaconLayout(
        input_ids=ids,
        attention_mask=valid.long(),
        position_ids=(valid.long().cumsum(1) - 1).clamp(min=0),
        death=death,
        is_beacon=is_beacon,
        completion_index=completion_index.long(),
        completion_ids=completion_ids,
        completion_mask=completion_mask.bool(),
    )


def last_hidden(output):
    """The final hidden states of a backbone's output (a `ModelOutput` or a tuple)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def backbone_and_head(model):
    """``(backbone, output_head)`` of a causal LM, through DDP and PEFT wrappers: the decoder that returns
    the final (normed) hidden states, and the ``(H) -> (V)`` projection applied to them."""
    from accelerate.utils import extract_model_from_parallel

    net = extract_model_from_parallel(model)
    net = net.get_base_model() if hasattr(net, "get_base_model") else net
    return net.base_model, net.get_output_embeddings()


def beacon_forward(
    model,
    layout: BeaconLayout,
    logits_to_keep: int | None = None,
    backend: str = "auto",
    return_hidden: bool = False,
):
    """One forward pass over the interleaved sequence under the beacon mask, with autograd.

    Reuses the ``"ngc"`` attention's replay path (`ngc_trl.engine.replay.ReplayContext` with a death tensor
    shared by every layer): dense boolean SDPA masks on CPU, FlexAttention on CUDA (``backend``). Works
    on PEFT-wrapped models. Under non-reentrant gradient checkpointing call
    `ngc_trl.engine.attention.enable_ngc_attention(model)` first (layers are recomputed after this returns).

    Parameters
    ----------
    model : causal LM (transformers `AttentionInterface` attention, e.g. Qwen2), possibly PEFT-wrapped.
    layout : `BeaconLayout` from `beacon_layout`.
    logits_to_keep : None for all ``T`` completion tokens, else the last ``k`` of them. The LM head runs
        only from the first slot needed onwards.
    backend : ``"auto"``, ``"dense"`` or ``"flex"`` (see `ReplayContext`).
    return_hidden : return the final hidden states ``(B, T, H)`` at the same slots instead of logits
        (``backbone_and_head(model)[1]`` maps them to the logits); the LM head then runs on one slot only,
        so a caller can project chunk by chunk and never hold ``(B, T, V)`` (`ngc_trl.breadcrumbs.distillation.token_kl`).

    Returns
    -------
    ``(B, T, V)`` (or ``(B, k, V)``) logits in the model's dtype: ``logits[:, t]`` predicts
    ``completion_ids[:, t]`` (``[:, -k:]``); beacon slots are never returned. ``(B, T, H)`` hidden states
    with ``return_hidden``.
    """
    index = (
        layout.completion_index if logits_to_keep is None else layout.completion_index[:, -logits_to_keep:]
    )
    s = layout.input_ids.shape[1]
    first = int(index.min()) if index.numel() else s - 1
    valid = layout.attention_mask.bool()
    offset = valid.long().argmax(1)  # slot of position 0: the replay works in positions
    death = torch.where(layout.death == NEVER, layout.death, layout.death - offset[:, None])
    ctx = ReplayContext(layout.attention_mask, death=death, backend=backend)
    captured = []
    hook = (
        backbone_and_head(model)[0].register_forward_hook(lambda m, a, out: captured.append(last_hidden(out)))
        if return_hidden
        else None
    )
    try:
        with use_ngc_attention(model):
            out = model(
                input_ids=layout.input_ids,
                attention_mask=no_mask(model),
                position_ids=layout.position_ids,
                ngc_replay=ctx,
                use_cache=False,
                logits_to_keep=1 if return_hidden else s - first,
            )
    finally:
        if hook is not None:
            hook.remove()
    if return_hidden:
        hidden = captured[-1]
        return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
    logits = out.logits
    return logits.gather(1, (index - first)[:, :, None].expand(-1, -1, logits.shape[-1]))


def beacon_logprobs(model, layout: BeaconLayout, temperature: float = 1.0) -> torch.Tensor:
    """``(B, T)`` fp32 log-probs of ``layout.completion_ids`` under ``logits / temperature`` and the beacon
    mask (0 on completion padding), with autograd. Matches the rollout's ``token_logprobs``."""
    if layout.completion_ids is None:
        raise ValueError("beacon_logprobs: the layout has no completion_ids (build it with beacon_layout)")
    logits = beacon_forward(model, layout)
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(
        -1, layout.completion_ids[..., None].long()
    )[..., 0]
    if layout.completion_mask is not None:
        logp = torch.where(layout.completion_mask, logp, torch.zeros_like(logp))
    return logp
