"""The Breadcrumbs distillation loss (Monea et al., arXiv 2510.13797; docs/method.md §8) as pure functions.

The student is distilled from the teacher on the teacher's own completion tokens (teacher detached)::

    distill_loss = Σ_{b,t} m_{b,t} KL_{b,t} / N

``KL_{b,t} = KL(p_T ‖ p_S)`` (``kl_direction="forward"``, default) or ``KL(p_S ‖ p_T)`` (``"reverse"``)
over the whole vocabulary, ``m`` the completion mask, ``N = B · max_completion_length`` with Dr. GRPO
(the same constant TRL divides the policy loss by, so coefficient 1 weighs one token of KL like one
token of policy gradient) and the number of completion tokens with any other ``loss_type``.

* `token_kl` — the per-token KL ``(B, T)``, chunk by chunk.
* `distillation_loss` — its masked sum over ``N``.

Memory: TRL's fused LM head never materialises the teacher's logits, so `token_kl` takes the teacher's
final hidden states (detached) and projects them chunk by chunk inside the KL (``distill_chunk_size``
tokens at a time, under activation checkpointing); the student's final hidden states
(`beacon_forward(return_hidden=True)`) are projected in the same chunks: the KL never holds a
``(B, T, V)`` tensor, only ``O(chunk · V)``.

Deviations from / choices beyond the paper (docs/method.md §8 "Choices"): the KL direction, its
normalisation, temperature 1 for both distributions (TRL's sampling ``temperature`` is not applied).
Torch only (no TRL import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_kl(
    student_logits,
    teacher_hidden,
    lm_head,
    mask,
    direction: str = "forward",
    chunk_size: int = 512,
    student_head=None,
):
    """Per-token vocabulary-wide KL between the student and the teacher, computed chunk by chunk.

    Parameters
    ----------
    student_logits : ``(B, T, V)`` logits (with autograd), ``[:, t]`` predicting completion token ``t``; or,
        with ``student_head``, the student's final hidden states ``(B, T, H)``, projected inside each chunk
        (with gradient to the hidden states and the head), so ``(B, T, V)`` is never held.
    teacher_hidden : ``(B, T, H)`` the teacher's final hidden states at the same predictions (detached);
        projected by ``lm_head`` inside each chunk, without gradient.
    lm_head : the teacher's output projection ``(H) -> (V)``.
    mask : ``(B, T)``, 1 on completion tokens; other tokens are skipped and get 0.
    direction : ``"forward"`` KL(p_T ‖ p_S) or ``"reverse"`` KL(p_S ‖ p_T), softmax at temperature 1, fp32.
    chunk_size : tokens per chunk; with grad each chunk runs under activation checkpointing, so only
        ``O(chunk_size · V)`` floats are alive at a time besides ``student_logits``.
    student_head : the student's output projection when ``student_logits`` are hidden states, else None.

    Returns
    -------
    ``(B, T)`` fp32 KL, 0 where ``mask`` is 0.
    """
    b, t, _ = student_logits.shape
    s_flat, h_flat = student_logits.reshape(b * t, -1), teacher_hidden.reshape(b * t, -1)
    m_flat = mask.reshape(-1).bool()
    reverse = direction == "reverse"
    out = []
    for s, h, m in zip(s_flat.split(chunk_size), h_flat.split(chunk_size), m_flat.split(chunk_size)):
        if not bool(m.any()):
            out.append(torch.zeros(m.shape, device=s.device))
        elif s.requires_grad:
            out.append(checkpoint(_kl_chunk, s, h, lm_head, reverse, student_head, use_reentrant=False) * m)
        else:
            out.append(_kl_chunk(s, h, lm_head, reverse, student_head) * m)
    return torch.cat(out).view(b, t)


def _kl_chunk(s, h, lm_head, reverse, student_head=None):
    with torch.no_grad():
        t_logp = F.log_softmax(lm_head(h).float(), -1)
    s_logp = F.log_softmax((s if student_head is None else student_head(s)).float(), -1)
    if reverse:
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def distillation_loss(kl, mask, loss_type: str, max_completion_length: int):
    """The distillation loss ``Σ_{b,t} kl_{b,t} / N`` (see the module docstring).

    ``kl``: ``(B, T)`` from `token_kl` (already 0 off the mask); ``mask``: ``(B, T)`` completion mask;
    ``N = B · max_completion_length`` when ``loss_type == "dr_grpo"``, else the number of masked tokens
    (at least 1).
    """
    if loss_type == "dr_grpo":
        norm = mask.shape[0] * max_completion_length
    else:
        norm = mask.sum().clamp(min=1)
    return kl.sum() / norm
