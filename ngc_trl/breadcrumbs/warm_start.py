"""Beacon SFT: a supervised warm start of a Breadcrumbs student under the beacon mask (not in the paper).

In the paper (docs/method.md §8) the compressing student starts from the pretrained model (Qwen2.5-1.5B-Instruct)
and learns to read its beacons only from the distillation loss of joint training. On the tiny testbed that
does not happen within a CPU budget: after 40 joint steps (640 rollouts) the students of its 1.6M-parameter
base stayed at ~1.5 nats/token KL to the teacher and solved nothing (README), where the base itself needed
~12k traces to learn the task.

The warm start teaches the student the beacon regime on the base's own SFT traces before joint training:
cross-entropy on the trace tokens, in one forward under the beacon layout (`ngc_trl.breadcrumbs.beacons`), with ``c``
drawn per row from ``compression_ratios``. The base predicts those traces at ~0.01 nats/token, so this
approximates distillation from the base (the teacher at step 0) without a teacher forward. Joint training
(`ngc_trl.breadcrumbs.trainer.BreadcrumbsTrainer`, ``student_model_name_or_path``) then starts its student here.

    trainer = BeaconSFTTrainer(model=model, args=SFTConfig(..., completion_only_loss=True),
                               train_dataset=prompt_completion_ds, processing_class=tok,
                               beacon_token_id=b, compression_ratios=[2, 4, 8, 16])
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from ngc_trl.breadcrumbs.beacons import beacon_forward, beacon_layout


def split_prompt_completion(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_token_id: int
):
    """Split a collated SFT batch into left-padded prompts and right-padded completions.

    Parameters
    ----------
    input_ids, attention_mask, labels : ``(B, L)`` right-padded rows (TRL's collator); ``labels`` is -100
        on the prompt (``completion_only_loss``) and on padding.
    pad_token_id : fills the padding.

    Returns
    -------
    ``(prompt_ids, prompt_mask, completion_ids, completion_mask)``: ``(B, P)`` left-padded and ``(B, T)``
    right-padded, with ``P`` / ``T`` the longest prompt / completion. A row's prompt is its valid tokens
    before the first supervised one.
    """
    valid = attention_mask.bool()
    supervised = (labels != -100) & valid
    n_valid = valid.sum(1)
    first = torch.where(supervised.any(1), supervised.float().argmax(1), n_valid)  # prompt length per row
    n_comp = n_valid - first
    bsz = input_ids.shape[0]
    p, t = int(first.max()), int(n_comp.max())
    prompt_ids = torch.full((bsz, p), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    completion_ids = torch.full((bsz, t), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    prompt_mask = torch.zeros((bsz, p), dtype=torch.long, device=input_ids.device)
    completion_mask = torch.zeros((bsz, t), dtype=torch.long, device=input_ids.device)
    for b in range(bsz):
        f, n = int(first[b]), int(n_valid[b])
        prompt_ids[b, p - f :] = input_ids[b, :f]
        prompt_mask[b, p - f :] = 1
        completion_ids[b, : n - f] = input_ids[b, f:n]
        completion_mask[b, : n - f] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


class BeaconSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` whose loss is the completion cross-entropy under the beacon mask.

    Same arguments as `trl.SFTTrainer` (prompt/completion data, ``completion_only_loss=True``, no packing
    or padding-free batches) plus ``beacon_token_id`` (already in the tokenizer and the model's
    embeddings: `ngc_trl.breadcrumbs.beacons.add_beacon_token`) and ``compression_ratios`` (``c`` drawn uniformly per
    row, reproducibly per step). Logs ``beacon_sft/compression_ratio``.
    """

    def __init__(self, *args, beacon_token_id: int, compression_ratios: list[int], **kwargs):
        if not compression_ratios or any(not isinstance(c, int) or c < 2 for c in compression_ratios):
            raise ValueError(f"compression_ratios={compression_ratios!r}: integers >= 2")
        super().__init__(*args, **kwargs)
        from ngc_trl.engine.attention import enable_ngc_attention

        enable_ngc_attention(
            self.model
        )  # plain SDPA without NGC kwargs; gradient checkpointing recomputes in backward
        if self.args.packing or self.args.padding_free:
            raise ValueError("BeaconSFTTrainer: packing / padding_free batches are not supported")
        self.beacon_token_id, self.compression_ratios = beacon_token_id, list(compression_ratios)
        self._calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean cross-entropy of the completion tokens under the beacon layout (sum over tokens divided
        by ``num_items_in_batch`` when the Trainer gives it, as its own loss)."""
        pad = self.processing_class.pad_token_id or 0
        prompt_ids, prompt_mask, completion_ids, completion_mask = split_prompt_completion(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"], pad
        )
        rng = random.Random(f"{self.args.seed}|{self._calls}|{self.accelerator.process_index}")
        self._calls += 1
        ratios = torch.tensor(
            [rng.choice(self.compression_ratios) for _ in range(prompt_ids.shape[0])],
            device=prompt_ids.device,
        )
        layout = beacon_layout(
            prompt_ids, prompt_mask, completion_ids, completion_mask, ratios, self.beacon_token_id
        )
        logits = beacon_forward(model, layout)  # (B, T, V)
        mask = completion_mask.bool()
        nll = F.cross_entropy(logits[mask].float(), completion_ids[mask], reduction="sum")
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = nll / torch.as_tensor(n, device=nll.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # n counts every rank's tokens; DDP averages
        mode = "train" if model.training else "eval"
        self._metrics[mode]["beacon_sft/compression_ratio"].append(ratios.float().mean().item())
        return (loss, {"logits": logits}) if return_outputs else loss
