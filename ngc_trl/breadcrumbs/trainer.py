"""Breadcrumbs Reasoning training (Monea et al., arXiv 2510.13797; docs/method.md §8) as a thin `GRPOTrainer` subclass.

One training step on one batch of rollouts:

1. **Teacher** (full KV cache): TRL's plain GRPO path, unchanged — plain ``model.generate`` rollouts,
   rewards, group advantages and TRL's loss (Dr. GRPO by default).
2. **Student** (compresses with beacons): one forward over prompt + the *teacher's* completion with a
   beacon interleaved every ``c`` completion tokens, under the beacon mask (`ngc_trl.breadcrumbs.beacons`), and a
   token-level KL to the teacher's full-cache distribution on the same tokens (teacher detached;
   `ngc_trl.breadcrumbs.distillation`, which defines ``KL_{b,t}``, ``m`` and ``N``)::

       L = L_GRPO(teacher) + distill_loss_coef · Σ_{b,t} m_{b,t} KL_{b,t} / N

The configuration, `BreadcrumbsConfig`, is in `ngc_trl.breadcrumbs.config`.

Teacher and student:

* **LoRA** (``peft_config``): two adapters, ``teacher`` and ``student``, on one frozen base. The student
  starts as a copy of the teacher adapter. ``teacher`` is active everywhere TRL runs the model; the
  student forward switches adapters and back. PEFT's ``set_adapter`` freezes the inactive adapter, so
  ``requires_grad`` is restored after each switch and both adapters are in the optimizer. Under
  gradient checkpointing the decoder layers are recomputed in ``backward()`` after the switch back, so
  each checkpointed layer's recompute is pinned to the adapter of its forward (`_pin_checkpoint_adapters`).
* **Full fine-tuning**: the student is a copy of the model (made before TRL patches it), with its own
  parameters added to the optimizer (`create_optimizer`) and, under DDP, its own DDP wrapper
  (DeepSpeed / FSDP: use LoRA).
* Gradients are clipped per policy (`_clip_grad_norm`): the teacher's update is then exactly TRL's GRPO
  update whatever the distillation term; ``grad_norm`` is the teacher's, ``breadcrumbs/student_grad_norm``
  the student's.

Memory: TRL's fused LM head never materialises the teacher's logits, so the teacher's final hidden
states are captured (detached) during TRL's own forward; the student's forward returns its final hidden
states too (`beacon_forward(return_hidden=True)`); both are projected chunk by chunk inside the KL
(`ngc_trl.breadcrumbs.distillation.token_kl`), which never holds a ``(B, T, V)`` tensor. No extra teacher
forward is run.

Deviations from / choices beyond the paper (docs/method.md §8 "Choices"; those of the KL itself are listed
in `ngc_trl.breadcrumbs.distillation`, the configurable ones in `ngc_trl.breadcrumbs.config`): the KL weight,
separate gradient clipping, ``c`` drawn per rollout from a list (not in the paper). With LoRA the beacon
embedding row stays at its init (the base is frozen); with full fine-tuning the student learns it. The
beacon token is suppressed in the teacher's rollouts.

Saving: ``output_dir`` holds the *student* (what users decode with: adapter or full model), the
tokenizer and ``ngc_settings.json`` (``BeaconConfig(compression_ratio=c,
beacon_token_id=b)``, read back by `ngc_trl.hub.load_ngc_settings`); the teacher goes to
``output_dir/teacher``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil

import torch
from trl import GRPOTrainer

from ngc_trl.breadcrumbs.beacons import (
    add_beacon_token,
    backbone_and_head,
    beacon_forward,
    beacon_layout,
    last_hidden,
)
from ngc_trl.breadcrumbs.config import BreadcrumbsConfig
from ngc_trl.breadcrumbs.distillation import distillation_loss, token_kl
from ngc_trl.engine.config import BeaconConfig

TEACHER_SUBFOLDER = "teacher"


def _pin_checkpoint_adapters(model) -> None:
    """Make every gradient-checkpointed layer recompute with the LoRA adapter(s) active in its forward.

    ``GradientCheckpointingLayer`` calls ``layer._gradient_checkpointing_func(partial(forward, ...), *args)``;
    the recompute in ``backward()`` runs ``forward`` again with whatever adapter is active *then*. The
    wrapper records the active adapters at forward time and sets them on the layer's LoRA modules around
    both the forward and its recompute (PEFT's ``_active_adapter``; no ``requires_grad`` toggling inside
    backward). Idempotent; re-applied each loss because TRL re-enables checkpointing after generation."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in model.modules():
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if (
            not isinstance(layer, GradientCheckpointingLayer)
            or fn is None
            or getattr(fn, "_bc_pinned", False)
        ):
            continue
        loras = [m for m in layer.modules() if isinstance(m, BaseTunerLayer)]
        if not loras:
            continue

        def pinned(function, *args, _fn=fn, _loras=loras, **kwargs):
            names = [m._active_adapter for m in _loras]

            def run(*a, **k):
                saved = [m._active_adapter for m in _loras]
                for m, n in zip(_loras, names):
                    m._active_adapter = n
                try:
                    return function(*a, **k)
                finally:
                    for m, n in zip(_loras, saved):
                        m._active_adapter = n

            return _fn(run, *args, **kwargs)

        pinned._bc_pinned = True
        layer._gradient_checkpointing_func = pinned


class BreadcrumbsTrainer(GRPOTrainer):
    """GRPO teacher + beacon-compressing student distilled from the teacher's rollouts (see the module
    docstring). Same arguments as `trl.GRPOTrainer` with ``args`` a `BreadcrumbsConfig`; ``model`` must not
    be a `PeftModel` (pass ``peft_config`` for the two-adapter form). With LoRA, ``beta`` must be 0."""

    _tag_names = ["trl", "grpo", "breadcrumbs", "kv-cache", "compression-beacons"]
    _name = "Breadcrumbs"
    _paper = {
        "title": "Breadcrumbs Reasoning: Memory-Efficient Reasoning with Compression Beacons",
        "id": "2510.13797",
        "citation": "@article{monea2025breadcrumbs, title={Breadcrumbs Reasoning: Memory-Efficient Reasoning with "
        "Compression Beacons}, author={Monea and Feldman and Padmanabhan and Brantley and Artzi}, "
        "journal={arXiv:2510.13797}, year={2025}}",
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: BreadcrumbsConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if not isinstance(args, BreadcrumbsConfig):
            raise TypeError("BreadcrumbsTrainer needs args=BreadcrumbsConfig(...)")
        if args.load_best_model_at_end:
            raise ValueError("BreadcrumbsTrainer: load_best_model_at_end is not supported")
        from accelerate.utils import is_peft_model
        from transformers import AutoModelForCausalLM

        from ngc_trl.engine.attention import enable_ngc_attention
        from ngc_trl.models import load_tokenizer

        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        if is_peft_model(model):
            raise ValueError("BreadcrumbsTrainer: pass the base model and a peft_config, not a PeftModel")
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path, padding_side="left")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.beacon_token_id = add_beacon_token(tokenizer, model, args.beacon_token, args.beacon_init)
        gen = dict(args.generation_kwargs or {})
        gen["suppress_tokens"] = sorted({*(gen.get("suppress_tokens") or []), self.beacon_token_id})
        args.generation_kwargs = gen  # the teacher never samples the beacon
        self.train_student = args.distill_loss_coef > 0
        self.use_lora = peft_config is not None
        self._adapter_names = (args.teacher_adapter_name, args.student_adapter_name)
        self.student_model = None
        if self.use_lora:
            if args.student_model_name_or_path:
                raise ValueError(
                    "BreadcrumbsConfig.student_model_name_or_path needs full fine-tuning (no peft_config): "
                    "with LoRA the student adapter starts as the teacher's"
                )
            if args.beta != 0.0:
                raise ValueError(
                    "BreadcrumbsTrainer with LoRA supports beta=0 only (TRL's reference adapter "
                    "logic assumes a single 'default' adapter)"
                )
            from peft import get_peft_model

            t_name, s_name = args.teacher_adapter_name, args.student_adapter_name
            model = get_peft_model(model, peft_config, adapter_name=t_name)
            model.add_adapter(s_name, peft_config)
            with torch.no_grad():  # the student starts as the teacher
                params = dict(model.named_parameters())
                for name, p in params.items():
                    if f".{s_name}." in name:
                        p.copy_(params[name.replace(f".{s_name}.", f".{t_name}.")])
            model.set_adapter(t_name)
            self._set_adapter_grads(model)
        elif args.student_model_name_or_path:
            self.student_model = self._load_student(args, model, tokenizer)
        else:
            self.student_model = copy.deepcopy(model)  # before TRL patches the forward
        enable_ngc_attention(model if self.use_lora else self.student_model)

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

        if self.use_lora:
            self._student_params = [p for n, p in self.model.named_parameters() if f".{s_name}." in n]
        else:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise NotImplementedError(
                    "BreadcrumbsTrainer: full fine-tuning of two models under DeepSpeed/FSDP "
                    "is not supported; use LoRA (peft_config)"
                )
            student = self.student_model
            student.config.use_cache = False
            if args.disable_dropout:
                from trl.trainer.utils import disable_dropout_in_model

                disable_dropout_in_model(student)
            if args.gradient_checkpointing:
                student.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
                )
            student.requires_grad_(self.train_student)
            self.student_wrapped = (
                self.accelerator.prepare_model(student)
                if self.train_student
                else student.to(self.accelerator.device)
            )
            self._student_params = list(student.parameters())
        self._student_ids = {id(p) for p in self._student_params}

    def _load_student(self, args, teacher, tokenizer):
        """The student model from ``student_model_name_or_path``: same vocabulary as the teacher (with the
        beacon) and the same beacon id in its own tokenizer, else a ValueError naming the field."""
        from transformers import AutoModelForCausalLM

        from ngc_trl.models import load_tokenizer

        path = args.student_model_name_or_path
        try:
            student = AutoModelForCausalLM.from_pretrained(path, **(args.model_init_kwargs or {}))
        except OSError as e:
            raise ValueError(
                f"BreadcrumbsConfig.student_model_name_or_path={path!r}: cannot load it ({e}); build a "
                f"beacon warm start with `python -m ngc_trl.testbed --beacon_ratios ...` or pass None"
            ) from e
        own = load_tokenizer(path)
        if own.convert_tokens_to_ids(args.beacon_token) != self.beacon_token_id or len(own) != len(tokenizer):
            raise ValueError(
                f"BreadcrumbsConfig.student_model_name_or_path={path!r}: its tokenizer must equal the "
                f"teacher's plus {args.beacon_token!r} at id {self.beacon_token_id} (a beacon warm start "
                f"of the same base)"
            )
        rows = teacher.get_input_embeddings().weight.shape[0]
        if student.get_input_embeddings().weight.shape[0] != rows:
            raise ValueError(
                f"BreadcrumbsConfig.student_model_name_or_path={path!r}: {rows} embedding rows expected "
                f"(the teacher's), got {student.get_input_embeddings().weight.shape[0]}"
            )
        student.to(teacher.dtype)
        return student

    # ------------------------------------------------------------------ settings
    def eviction_config(self) -> BeaconConfig:
        """How to decode with the student: ``BeaconConfig(c, beacon id)`` (the first ratio trained)."""
        return BeaconConfig(
            beacon_token_id=self.beacon_token_id, compression_ratio=self.args.compression_ratios[0]
        )

    def breadcrumbs_training_info(self) -> dict:
        """The run's Breadcrumbs settings beyond `eviction_config` (for ``ngc_training.json``)."""
        a = self.args
        return {
            "method": "breadcrumbs",
            "compression_ratios": a.compression_ratios,
            "beacon_token": a.beacon_token,
            "beacon_init": a.beacon_init,
            "kl_direction": a.kl_direction,
            "distill_loss_coef": a.distill_loss_coef,
            "use_peft": self.use_lora,
            "teacher_subfolder": TEACHER_SUBFOLDER,
            "loss_type": a.loss_type,
            "student_init": a.student_model_name_or_path or "teacher copy",
        }

    # ------------------------------------------------------------------ teacher / student plumbing
    def _set_adapter_grads(self, peft_model):
        """PEFT's ``set_adapter`` freezes the inactive adapter: make both trainable again (the student only
        when it is trained), so both stay in the optimizer and get gradients."""
        teacher, student = self._adapter_names
        peft_model.set_requires_grad([teacher], True)
        peft_model.set_requires_grad([student], self.train_student)

    @contextlib.contextmanager
    def _student(self, model):
        """The student model to call: the PEFT model with the student adapter active (LoRA), else the copy."""
        if not self.use_lora:
            self.student_model.train(self.model.training)
            yield self.student_wrapped
            return
        peft_model = self.accelerator.unwrap_model(model)
        peft_model.set_adapter(self.args.student_adapter_name)
        self._set_adapter_grads(peft_model)
        try:
            yield peft_model
        finally:
            peft_model.set_adapter(self.args.teacher_adapter_name)
            self._set_adapter_grads(peft_model)

    def _teacher_modules(self):
        """(backbone, lm_head) of the teacher: TRL's fused head runs ``backbone`` then ``lm_head``."""
        return backbone_and_head(self.model)

    def _draw_ratios(self, n: int, device):
        """``c`` for each of ``n`` rollouts: the int, or ``(n,)`` draws from the list (reproducible per step)."""
        cs = self.args.compression_ratios
        if len(cs) == 1:
            return cs[0]
        rng = random.Random(f"{self.args.seed}|{self._step}|{self.accelerator.process_index}")
        return torch.tensor([rng.choice(cs) for _ in range(n)], device=device)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        if self.use_lora and self.args.gradient_checkpointing:
            _pin_checkpoint_adapters(self.accelerator.unwrap_model(model))
        backbone, lm_head = self._teacher_modules()
        hidden = []
        handle = backbone.register_forward_hook(lambda m, a, out: hidden.append(last_hidden(out).detach()))
        try:
            grpo_loss = super()._compute_loss(model, inputs)  # TRL's teacher loss (already / GA in train)
        finally:
            handle.remove()
        p, t = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
        teacher_hidden = torch.cat(hidden)[:, p - 1 : p + t - 1]  # (B, T, H): predicts completion token t
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        ratios = self._draw_ratios(mask.shape[0], mask.device)
        layout = beacon_layout(
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            ratios,
            self.beacon_token_id,
        )
        with (
            self._student(model) as student,
            torch.set_grad_enabled(torch.is_grad_enabled() and self.train_student),
            self.accelerator.autocast(),
        ):
            hidden_s = beacon_forward(student, layout, return_hidden=True)  # (B, T, H): no (B, T, V) logits
            kl = token_kl(
                hidden_s,
                teacher_hidden,
                lm_head,
                mask,
                self.args.kl_direction,
                self.args.distill_chunk_size,
                student_head=backbone_and_head(student)[1],
            )
        distill_loss = distillation_loss(kl, mask, self.loss_type, self.max_completion_length)
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["breadcrumbs/grpo_loss"].append(gather(grpo_loss.detach() * ga).mean().item())
        metrics["breadcrumbs/distill_loss"].append(gather(distill_loss.detach()).mean().item())
        totals = self.accelerator.reduce(
            torch.stack([kl.detach().sum(), mask.sum().float()]), reduction="sum"
        )
        metrics["breadcrumbs/kl_per_token"].append((totals[0] / totals[1].clamp(min=1)).item())
        c = torch.as_tensor(ratios, device=mask.device).float().expand(mask.shape[0]).contiguous()
        metrics["breadcrumbs/compression_ratio"].append(gather(c).mean().item())
        beacons = layout.is_beacon.sum(1).float()
        metrics["breadcrumbs/beacons"].append(gather(beacons).mean().item())
        if not self.train_student:
            return grpo_loss
        return grpo_loss + self.args.distill_loss_coef * distill_loss / ga

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None):
        """TRL/transformers' optimizer, plus the full-fine-tuning student's parameters (same decay rule); the
        student's parameters (a copy's, or the student adapter's) get ``student_learning_rate`` if set."""
        optimizer = super().create_optimizer(model)
        if self.student_model is not None and self.train_student:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not all(id(p) in known for p in self._student_params):
                decay = set(self.get_decay_parameter_names(self.student_model))
                named = list(self.student_model.named_parameters())
                optimizer.add_param_group(
                    {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay}
                )
                optimizer.add_param_group(
                    {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}
                )
        lr = self.args.student_learning_rate
        if lr is not None and self.train_student:
            groups = list(optimizer.param_groups)
            optimizer.param_groups.clear()
            for g in groups:  # split every group into its teacher part and its student part
                student = [p for p in g["params"] if id(p) in self._student_ids]
                teacher = [p for p in g["params"] if id(p) not in self._student_ids]
                for params, group_lr in ((teacher, g["lr"]), (student, lr)):
                    if params:
                        optimizer.param_groups.append({**g, "params": params, "lr": group_lr})
        return optimizer

    def _clip_grad_norm(self, model):
        """Clip teacher and student gradients separately (see the module docstring); returns the teacher's."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not self.train_student:
            return super()._clip_grad_norm(model)
        teacher = [p for p in model.parameters() if p.requires_grad and id(p) not in self._student_ids]
        norm = self.accelerator.clip_grad_norm_(teacher, self.args.max_grad_norm)  # unscales all grads (fp16)
        student = [p for p in self._student_params if p.grad is not None]
        s_norm = (
            torch.nn.utils.clip_grad_norm_(student, self.args.max_grad_norm) if student else torch.zeros(())
        )
        self._metrics["train"]["breadcrumbs/student_grad_norm"].append(float(s_norm))
        return norm

    # ------------------------------------------------------------------ saving / resuming
    def _save(self, output_dir: str | None = None, state_dict=None):
        """``output_dir``: the student (adapter or model), tokenizer, settings; ``output_dir/teacher``: the
        teacher. Every checkpoint gets the same layout."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        teacher_dir = os.path.join(output_dir, TEACHER_SUBFOLDER)
        if not self.use_lora:
            super()._save(teacher_dir, state_dict=state_dict)  # the teacher (+ tokenizer, args) via Trainer
            if self.args.should_save:
                self.student_model.save_pretrained(output_dir)
        elif self.args.should_save:
            peft_model = self.accelerator.unwrap_model(self.model)
            os.makedirs(output_dir, exist_ok=True)
            s_name, t_name = self.args.student_adapter_name, self.args.teacher_adapter_name
            # the student carries the (resized) embeddings: it is what users load; PEFT writes a non-default
            # adapter to <dir>/<name>, so the student's files are moved up to output_dir
            peft_model.save_pretrained(
                output_dir, selected_adapters=[s_name], save_embedding_layers=True, state_dict=state_dict
            )
            for f in os.listdir(os.path.join(output_dir, s_name)):
                os.replace(os.path.join(output_dir, s_name, f), os.path.join(output_dir, f))
            shutil.rmtree(os.path.join(output_dir, s_name))
            peft_model.save_pretrained(
                output_dir, selected_adapters=[t_name], save_embedding_layers=False, state_dict=state_dict
            )
            if t_name != TEACHER_SUBFOLDER:
                shutil.rmtree(teacher_dir, ignore_errors=True)
                os.replace(os.path.join(output_dir, t_name), teacher_dir)
        if not self.args.should_save:
            return
        from ngc_trl.hub import write_ngc_settings

        self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        write_ngc_settings(output_dir, self.eviction_config(), self.breadcrumbs_training_info())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume from the layout `_save` writes (student at the top, teacher in ``teacher/``)."""
        teacher_dir = os.path.join(resume_from_checkpoint, TEACHER_SUBFOLDER)
        if not self.use_lora:
            super()._load_from_checkpoint(teacher_dir, model)
            super()._load_from_checkpoint(resume_from_checkpoint, self.student_model)
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        peft_model = self.accelerator.unwrap_model(self.model if model is None else model)
        for folder, name in (
            (resume_from_checkpoint, self.args.student_adapter_name),
            (teacher_dir, self.args.teacher_adapter_name),
        ):
            weights = load_file(
                os.path.join(folder, "adapter_model.safetensors"), device=str(self.accelerator.device)
            )
            set_peft_model_state_dict(peft_model, weights, adapter_name=name)
        peft_model.set_adapter(self.args.teacher_adapter_name)
        self._set_adapter_grads(peft_model)
