"""`NGCTrainer`: TRL's `GRPOTrainer` whose rollouts evict and whose loss is on-policy for them.

A thin subclass that overrides hooks only (TRL 1.16; `tests/test_trl_hooks.py` fails loudly if their
signatures change):

* `_generate`: budget-aware interoception — one eviction rate per prompt group, written into the prompt.
* `_generate_single_turn`: rollouts through `generate_with_eviction` with Gumbel-top-k evictions at the
  rate in force (curriculum, Eq. 6); the records are kept for the replay. Beyond the paper, with
  ``one_sampled_round`` a group draws its evictions at one round only and takes the top-k at the others,
  and with ``greedy_rollout_tokens`` (eviction-only) the tokens are decoded greedily.
* `_generate_and_score_completions`: adds the records to the batch as padded per-sample tensors (first
  dim ``B``, so TRL's shuffle/split keep them aligned), and the "old" eviction log-probs when TRL computes
  old token log-probs (``num_iterations > 1``).
* `_get_per_token_logps_and_entropies`: the replay forward — per-layer masks, eviction log-probs with grad
  (under reentrant or non-reentrant gradient checkpointing too: they leave each checkpointed layer as
  outputs of its checkpoint).
* `_compute_loss`: ``L = token_loss_coef · L_token + eviction_loss_coef · L_mem`` (paper: both 1) (`ngc_trl.ngc.loss.eviction_policy_loss`:
  the clipped surrogate over eviction actions with the same group advantages, summed over layers,
  averaged over each rollout's rounds, divided by Dr. GRPO's ``B · max_completion_length``; paper Eq. 4–5).

The flow of one batch: rollout (`generate_with_eviction` records every action) → records (padded tensors
in the batch dict) → replay (one forward with per-layer masks that recomputes every action's log-prob on
the graph) → loss. What a batch carries between TRL's hooks lives in one `BatchScope`, open only while
`_generate_and_score_completions` (the rollout phase) or `_compute_loss` (the loss phase) runs.
* `_calculate_rewards`: the optional minimum-length penalty.
* `_prepare_inputs`, `_save_checkpoint`, `_load_optimizer_and_scheduler`: the optional reward-gated
  curriculum (``curriculum_gate``, beyond the paper): each training batch's mean reward updates the gate,
  whose state is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation

from ngc_trl.engine.attention import enable_ngc_attention, no_mask
from ngc_trl.engine.generation import EvictionOutput, generate_with_eviction
from ngc_trl.engine.records import EvictionRecords
from ngc_trl.engine.replay import ReplayContext, route_eviction_logps_through_checkpoints
from ngc_trl.ngc.config import NGCConfig
from ngc_trl.ngc.curriculum import GatedCurriculum, curriculum_rate
from ngc_trl.ngc.interoception import add_rate_tag
from ngc_trl.ngc.loss import eviction_policy_loss
from ngc_trl.policies.score_head import (
    attach_saved_score_head,
    attach_score_head,
    detach_score_head,
    find_score_head,
    load_score_head,
    save_score_head,
)

logger = logging.getLogger(__name__)

GATE_FILE = "ngc_curriculum_gate.json"  # the reward-gated curriculum's state, in every checkpoint folder


def replay_chunks(attention_mask: torch.Tensor, max_rows: int, max_tokens: int = 0):
    """Split a right-padded batch into length-sorted chunks for the replay forward.

    ``attention_mask (B, T)`` (left-padded prompts, right-padded completions). Rows are sorted by the end of
    their last valid token; each chunk holds at most ``max_rows`` rows and, if ``max_tokens > 0``, at most
    ``max_tokens`` padded tokens (``rows × end``). Yields ``(rows (n,) long, end int)``: the chunk's row ids
    and the width its inputs are trimmed to. Trimming right padding is exact (causal attention; padded
    positions carry no loss), and sorting keeps short completions from being padded to the longest one.
    """
    t = attention_mask.shape[1]
    idx = torch.arange(1, t + 1, device=attention_mask.device)
    ends = (attention_mask.bool() * idx).amax(1).clamp(min=1)
    order = ends.argsort(stable=True)
    start, n = 0, order.numel()
    while start < n:
        stop = min(start + max_rows, n)
        if max_tokens > 0:
            while stop - start > 1 and (stop - start) * int(ends[order[stop - 1]]) > max_tokens:
                stop -= 1
        rows = order[start:stop]
        yield rows, int(ends[rows].max())
        start = stop


@dataclass
class BatchScope:
    """What one batch carries between TRL's hooks (rows ``B``, rounds ``R``, layers ``L``).

    ``phase`` is ``"rollout"`` (opened by `NGCTrainer._generate_and_score_completions`: generation, rewards
    and TRL's no-grad passes) or ``"loss"`` (opened by `NGCTrainer._compute_loss`: the replay with grad).

    Attributes:
        row_rates: ``(B,)`` ε of each rollout (set by ``_generate``: curriculum or interoception).
        rollout: the `EvictionOutput` of the batch (set by ``_generate_single_turn``).
        records, prompt_len: what the replay forward replays (``prompt_len (B,)``).
        sampled_round: ``(B,)`` long, the one round whose evictions each rollout sampled
            (``one_sampled_round``; None: every round was sampled, the paper).
        expects_old_pass: TRL will run its no-grad "old" log-prob pass in this rollout phase (its own
            condition, ``gradient_accumulation_steps % (steps_per_generation · num_iterations) != 0``);
            that pass is the first no-grad replay, before any reference-model pass.
        old_evict_logp: ``(B, R, L)`` the eviction log-probs of that old pass (the PPO "old" policy).
        evict_logp, evict_entropy: ``(B, R, L)`` of the latest replay (with grad in the loss phase).
    """

    phase: str
    row_rates: torch.Tensor | None = None
    rollout: EvictionOutput | None = None
    records: EvictionRecords | None = None
    prompt_len: torch.Tensor | None = None
    sampled_round: torch.Tensor | None = None
    expects_old_pass: bool = False
    old_evict_logp: torch.Tensor | None = None
    evict_logp: torch.Tensor | None = None
    evict_entropy: torch.Tensor | None = None


class NGCTrainer(GRPOTrainer):
    """GRPO trainer for Neural Garbage Collection. Takes the same arguments as `trl.GRPOTrainer`, with
    ``args`` an `NGCConfig`. vLLM / paged generation and multi-turn tool loops are not supported: the
    rollouts need the evicting decode loop."""

    _tag_names = ["trl", "grpo", "ngc", "kv-cache", "neural-garbage-collection"]
    _name = "NGC"
    _paper = {
        "title": "Neural Garbage Collection: Learning to Forget while Learning to Reason",
        "id": "2604.18002",
        "citation": "@article{li2026ngc, title={Neural Garbage Collection: Learning to Forget while Learning "
        "to Reason}, author={Li and Hamid and Fox and Goodman}, journal={arXiv:2604.18002}, year={2026}}",
    }

    def __init__(self, *args, **kwargs):
        if kwargs.get("tools") or kwargs.get("environment_factory"):
            raise ValueError(
                "NGCTrainer: tools / environments are not supported (a tool loop re-enters the rollout "
                "and the eviction records of its turns are not joined); pass tools=None"
            )
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NGCConfig):
            raise TypeError("NGCTrainer needs args=NGCConfig(...)")
        if self.aux_loss_enabled:
            raise ValueError(
                "NGCTrainer: the MoE router auxiliary loss is not supported by the replay forward; set "
                "NGCConfig.router_aux_loss_coef=0"
            )
        self.eviction = self.args.eviction_config()
        if self.args.eviction_policy == "score_head" and find_score_head(self.model) is None:
            folder = getattr(self.model, "name_or_path", None)  # the head is saved beside the weights
            if not attach_saved_score_head(self.model, folder):
                raise ValueError(
                    f"NGCConfig.eviction_policy='score_head': the model {folder!r} has no scoring head "
                    "(score_head.json); fit one first (`python -m ngc_trl.warm_start`) or attach one "
                    "(ngc_trl.policies.score_head.attach_score_head)"
                )
        # for good, not in a context: checkpointed layers are recomputed in backward()
        enable_ngc_attention(self.model)
        if self.ref_model is not None:
            enable_ngc_attention(self.ref_model)
        self.num_layers = self.model.config.get_text_config().num_hidden_layers
        self.meta_token_id = None
        if self.args.meta_token:
            ids = self.processing_class.convert_tokens_to_ids([self.args.meta_token])
            if ids[0] is None or ids[0] == self.processing_class.unk_token_id:
                raise ValueError(
                    f"NGCConfig.meta_token={self.args.meta_token!r} is not in the tokenizer; "
                    "add it with ngc_trl.engine.special_tokens.add_special_token first"
                )
            self.meta_token_id = ids[0]
        self._scope: BatchScope | None = None  # open only inside a rollout or loss phase
        a = self.args
        self.curriculum_gate = (
            None
            if a.curriculum_gate is None
            else GatedCurriculum(
                a.curriculum_rates,
                a.curriculum_stage_steps,
                a.curriculum_alpha,
                gate=a.curriculum_gate,
                reference=a.curriculum_gate_reference,
                ema=a.curriculum_gate_ema,
            )
        )

    # ------------------------------------------------------------------ rates
    def rate_in_force(self, step: int | None = None) -> float:
        """ε of the curriculum at ``step`` (default: the current global step), else the constant rate. With
        ``curriculum_gate`` (beyond the paper) the staircase runs on the gate's stage clock instead of the
        global step (`GatedCurriculum`)."""
        a = self.args
        if a.curriculum_rates is None:
            return a.eviction_rate
        step = self.state.global_step if step is None else step
        if self.curriculum_gate is not None:
            return self.curriculum_gate.rate(step)
        return curriculum_rate(step, a.curriculum_rates, a.curriculum_stage_steps, a.curriculum_alpha)

    def _group_rate(self, prompt) -> float:
        """One rate per prompt group, the same on every rank: a hash of (step, prompt) picks it."""
        rates = self.args.interoception_rates
        key = f"{self.state.global_step}|{prompt}".encode()
        return rates[int(hashlib.sha256(key).hexdigest(), 16) % len(rates)]

    # ------------------------------------------------------------------ reward-gated curriculum
    def _prepare_inputs(self, generation_batch):
        """TRL's; after a training rollout batch was scored, feeds its mean reward (TRL's ``reward``
        metric, computed from the rewards gathered over all processes) to `curriculum_after_rollout`."""
        rewards = self._metrics["train"]["reward"]
        seen = len(rewards)
        out = super()._prepare_inputs(generation_batch)
        rewards = self._metrics["train"]["reward"]
        if self.model.training and len(rewards) > seen:
            self.curriculum_after_rollout(rewards[-1])
        return out

    def curriculum_after_rollout(self, mean_reward: float) -> None:
        """Log the stage clock the batch was generated at (``ngc/curriculum_stage_step``: the global step
        under Eq. 6) and, with ``curriculum_gate``, update the gate with the batch's mean reward (logs
        ``ngc/curriculum_gate_pass`` and ``ngc/curriculum_gate_reference``)."""
        if self.args.curriculum_rates is None:
            return
        step, metrics = self.state.global_step, self._metrics["train"]
        gate = self.curriculum_gate
        metrics["ngc/curriculum_stage_step"].append(
            float(step if gate is None else gate.effective_step(step))
        )
        if gate is None:
            return
        metrics["ngc/curriculum_gate_pass"].append(float(gate.update(step, mean_reward)))
        ref = gate.reference_reward()
        if ref is not None:
            metrics["ngc/curriculum_gate_reference"].append(ref)

    def _save_checkpoint(self, model, trial):
        """TRL's, plus the gate's state in ``checkpoint-N/ngc_curriculum_gate.json`` (written atomically)."""
        super()._save_checkpoint(model, trial)
        if self.curriculum_gate is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            tmp = os.path.join(folder, GATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.curriculum_gate.state_dict(), f)
            os.replace(tmp, os.path.join(folder, GATE_FILE))

    # ------------------------------------------------------------------ the scoring head (not in the paper)
    def create_optimizer(self, model=None):
        """Transformers', with the `score_head` policy's head in its own group at
        ``score_head_learning_rate`` (no weight decay) when that is set."""
        lr = self.args.score_head_learning_rate
        if self.optimizer is not None or lr is None or find_score_head(self.model) is None:
            return super().create_optimizer(model)
        head = detach_score_head(self.model)
        try:
            super().create_optimizer(model)
        finally:
            attach_score_head(self.model, head)
        self.optimizer.add_param_group({"params": list(head.parameters()), "lr": lr, "weight_decay": 0.0})
        return self.optimizer

    def _save(self, output_dir=None, state_dict=None):
        """Transformers', plus the scoring head as ``score_head.safetensors`` / ``score_head.json`` beside the
        weights, which stay the base architecture's (the head is not in them)."""
        head = detach_score_head(self.model) if state_dict is None else None
        try:
            super()._save(output_dir, state_dict)
        finally:
            if head is not None:
                attach_score_head(self.model, head)
        head = find_score_head(self.model)
        if head is not None and self.args.should_save:
            save_score_head(head, output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Transformers', plus the scoring head saved in the checkpoint (its weights in place)."""
        head = detach_score_head(self.model if model is None else model)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            if head is not None:
                attach_score_head(self.model if model is None else model, head)
        if head is not None:
            saved = load_score_head(resume_from_checkpoint)
            if saved is None:
                raise ValueError(
                    f"{resume_from_checkpoint}: no score_head.json to resume the scoring head from"
                )
            head.load_state_dict(saved.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        """TRL's, plus the gate's state from the checkpoint (called on resume by every backend). A checkpoint
        without one (e.g. from a run without the gate) resumes with the clock at the global step."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.curriculum_gate is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, GATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self.curriculum_gate.load_state_dict(json.load(f))
        else:
            logger.warning(
                f"{path} not found: the gated curriculum resumes at stage step "
                f"{self.state.global_step} with no reference reward"
            )
            self.curriculum_gate.stage_step = self.curriculum_gate.anchor_step = self.state.global_step

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list):
        if self.args.interoception_rates is not None:
            rates = [self._group_rate(p) for p in prompts]
            prompts = [add_rate_tag(p, r) for p, r in zip(prompts, rates)]
        else:
            rates = [self.rate_in_force()] * len(prompts)
        if self._scope is not None:
            self._scope.row_rates = torch.tensor(rates, dtype=torch.float32)
        return super()._generate(prompts)

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        device = self.accelerator.device
        pad = self.processing_class.pad_token_id
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p, device=device)
            mask[i, width - len(p) :] = 1
        scope = self._scope
        rates = scope.row_rates if scope is not None and scope.row_rates is not None else None
        if rates is None:
            rates = torch.full((len(prompt_ids),), self.rate_in_force())
        sampled_round = self._draw_sampled_rounds(prompt_ids)
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            was_training = model.training
            model.eval()
            out = generate_with_eviction(
                model,
                ids,
                mask,
                self.eviction,
                max_new_tokens=self.max_completion_length,
                do_sample=not self.args.greedy_rollout_tokens,  # greedy: the evictions are the only draws
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k or 0,
                sample_evictions=True,
                eos_token_id=self.eos_token_ids,
                pad_token_id=pad,
                eviction_rate=rates.to(device),
                forced_token_id=self.meta_token_id,
                sampled_round=None if sampled_round is None else sampled_round.to(device),
            )
            model.train(was_training)
        if scope is not None:
            scope.rollout, scope.records, scope.prompt_len = out, out.records, mask.sum(1)
            scope.sampled_round = sampled_round
        self._log_cache_stats(out, rates)
        return out.completion_ids, None

    def _draw_sampled_rounds(self, prompt_ids: list) -> torch.Tensor | None:
        """``(B,)`` long: with ``one_sampled_round = k`` (beyond the paper), the round each rollout samples, one
        draw uniform in ``[0, k)`` per prompt group (consecutive rows with the same prompt, as TRL lays a
        generation batch out), so a group shares its top-k prefix up to that round; None when off."""
        k = self.args.one_sampled_round
        if not k:
            return None
        group = torch.zeros(len(prompt_ids), dtype=torch.long)
        for i in range(1, len(prompt_ids)):
            group[i] = group[i - 1] + int(list(prompt_ids[i]) != list(prompt_ids[i - 1]))
        return torch.randint(k, (int(group[-1]) + 1,))[group] if len(prompt_ids) else group

    def _log_cache_stats(self, out, rates):
        mode = "train" if self.model.training else "eval"
        st = out.cache_stats
        steps = st.full_entries.clamp(min=1).float()
        logs = {
            "ngc/eviction_rate": rates.float().mean(),
            "ngc/mean_entries": (st.footprint.float().mean(1) / steps).mean(),
            "ngc/peak_entries": st.peak_entries.float().mean(),
            "ngc/peak_compression": st.compression.float().mean(),
            "ngc/prompt_kept": st.prompt_kept.float().mean(),
            "ngc/rounds": (out.records.positions >= 0).sum(1).float().mean(),
        }
        for k, v in logs.items():
            self._metrics[mode][k].append(
                self.accelerator.gather(v.to(self.accelerator.device)).mean().item()
            )

    @contextmanager
    def _open_scope(self, phase: str, **fields):
        """Open the batch's `BatchScope` for the duration of one phase (nesting is a bug)."""
        if self._scope is not None:
            raise RuntimeError(f"NGCTrainer: a {self._scope.phase} phase is still open")
        self._scope = BatchScope(phase, **fields)
        try:
            yield self._scope
        finally:
            self._scope = None

    def _generate_and_score_completions(self, inputs):
        generate_every = self.args.steps_per_generation * self.num_iterations
        expects_old = self.args.gradient_accumulation_steps % generate_every != 0
        with self._open_scope("rollout", expects_old_pass=expects_old) as scope:
            out = super()._generate_and_score_completions(inputs)
        if (out.get("old_per_token_logps") is not None) != expects_old:
            raise RuntimeError(
                "NGCTrainer: TRL's old log-prob pass no longer follows its documented condition"
            )
        records = scope.records
        masked = out["completion_mask"].sum(1) == 0  # mask_truncated_completions: no token loss, so no L_mem
        if masked.any():
            records = records.cleared(masked)
        out.update(records.as_dict())
        out["ngc_prompt_len"] = scope.prompt_len
        if scope.sampled_round is not None:
            out["ngc_sampled_round"] = scope.sampled_round.to(out["ngc_prompt_len"].device)
        if scope.old_evict_logp is not None:
            out["ngc_old_logp"] = scope.old_evict_logp
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        scope = self._scope
        if self.args.min_length_penalty and scope is not None and scope.rollout is not None:
            fired = (scope.rollout.records.positions[:, 0] >= 0).to(rewards.device)
            rewards = rewards * fired[:, None].to(rewards.dtype)
        return rewards

    # ------------------------------------------------------------------ replay
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        if any(v is not None for v in multimodal.values()):
            raise ValueError("NGCTrainer supports text-only models")
        scope = self._scope
        records, prompt_len = (scope.records, scope.prompt_len) if scope is not None else (None, None)
        route_eviction_logps_through_checkpoints(model)  # L_mem's gradient under any checkpointing mode
        n_rows, width = input_ids.shape
        logps = input_ids.new_zeros((n_rows, logits_to_keep), dtype=torch.float32)
        entropies = torch.zeros_like(logps) if compute_entropy else None
        evict = []
        for rows, end in replay_chunks(attention_mask, batch_size or n_rows, self.args.replay_chunk_tokens):
            end = max(end, width - logits_to_keep + 1)  # at least one completion position
            ids, am = input_ids[rows, :end], attention_mask[rows, :end]
            keep = logits_to_keep - (
                width - end
            )  # completion positions left after trimming the right padding
            rec = records.select(rows) if records is not None else None
            if rec is not None and prompt_len is not None:
                masked = am.sum(1) <= prompt_len[rows]  # completion masked out (mask_truncated_completions)
                if masked.any():
                    rec = rec.cleared(masked)
            ctx = ReplayContext(
                am,
                rec,
                self.eviction,
                prompt_len=None if prompt_len is None else prompt_len[rows],
                replay_masks=self.args.replay_masks,
                eviction_logps=rec is not None,
                backend=self.args.replay_backend,
                model=model,
            )
            labels = ids.masked_fill(am == 0, -100)
            labels[:, :-keep] = -100
            with self.accelerator.autocast():
                o = model(
                    input_ids=ids,
                    attention_mask=no_mask(self.model),
                    position_ids=ctx.position_ids,
                    labels=labels,
                    fused_lm_head=True,
                    ngc_replay=ctx,
                )
            logps = logps.index_put(
                (rows[:, None], torch.arange(keep, device=rows.device)[None]), o.log_probs[:, -keep:].float()
            )
            if compute_entropy:
                entropies = entropies.index_put(
                    (rows[:, None], torch.arange(keep, device=rows.device)[None]),
                    o.entropy[:, -keep:].float(),
                )
            if ctx.records is not None:
                evict.append(
                    (rows, ctx.eviction_logp(self.num_layers), ctx.eviction_entropy(self.num_layers))
                )
        if scope is not None:
            scope.evict_logp = scope.evict_entropy = None
            if evict:
                order = torch.cat([r for r, _, _ in evict]).argsort()  # back to the batch's row order
                scope.evict_logp = torch.cat([lp for _, lp, _ in evict])[order]
                scope.evict_entropy = torch.cat([e for _, _, e in evict])[order]
                old_pass = (
                    scope.phase == "rollout" and scope.expects_old_pass and scope.old_evict_logp is None
                )
                if old_pass and not torch.is_grad_enabled():
                    scope.old_evict_logp = scope.evict_logp
        return logps, entropies, None

    def _compute_loss(self, model, inputs):
        records = EvictionRecords.from_dict(inputs) if "ngc_positions" in inputs else None
        with self._open_scope("loss", records=records, prompt_len=inputs.get("ngc_prompt_len")) as scope:
            loss = super()._compute_loss(model, inputs)
        loss = self.args.token_loss_coef * loss  # 1 in the paper; 0: the eviction-only diagnostic
        mode = "train" if self.model.training else "eval"
        if records is None or scope.evict_logp is None:
            return loss
        new, acted = scope.evict_logp, records.acted
        if "ngc_sampled_round" in inputs:  # one_sampled_round: the other rounds drew no action (top-k)
            sampled = inputs["ngc_sampled_round"].to(acted.device)[:, None]
            acted = acted & (torch.arange(acted.shape[1], device=acted.device)[None] == sampled)[..., None]
        m = acted.to(new.dtype)
        evict_loss = eviction_policy_loss(
            new,
            inputs.get("ngc_old_logp", new.detach()),
            acted,
            inputs["advantages"],
            new.shape[0] * self.max_completion_length,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.args.delta,
            sequence_level=self.importance_sampling_level == "sequence",
        )
        if mode == "train":  # TRL's loss is already divided by GA in training (not in eval)
            evict_loss = evict_loss / self.current_gradient_accumulation_steps
        ent = (scope.evict_entropy * m).sum() / m.sum().clamp(min=1)
        gather = self.accelerator.gather
        self._metrics[mode]["ngc/evict_loss"].append(gather(evict_loss.detach()).mean().item())
        self._metrics[mode]["ngc/evict_entropy"].append(gather(ent.detach()).mean().item())
        self._metrics[mode]["ngc/evict_logp"].append(
            gather((new.detach() * m).sum() / m.sum().clamp(min=1)).mean().item()
        )
        # L_mem itself is ~0 by construction (advantages sum to zero in a group); what moves is the log-prob of
        # the actions of rollouts that did better (A > 0) against worse (A < 0) than their group
        for name, sign in (("pos", 1), ("neg", -1)):
            sel = m * (inputs["advantages"] * sign > 0).to(m.dtype)[:, None, None]
            lp = (new.detach() * sel).sum() / sel.sum().clamp(min=1)
            self._metrics[mode][f"ngc/evict_logp_adv_{name}"].append(gather(lp).mean().item())
        if self.args.eviction_loss_coef == 0:
            return loss
        return loss + self.args.eviction_loss_coef * evict_loss
