"""Train a reasoning model to evict its own KV cache (Neural Garbage Collection) with `NGCTrainer`, or a
Breadcrumbs student (compression beacons) next to its GRPO teacher with `BreadcrumbsTrainer`.

Usage::

    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml -m ngc_trl.train \\
        --config recipes/countdown.yaml
    python -m ngc_trl.train --config recipes/tiny/countdown_ngc.yaml --max_steps 5   # CPU, offline
    ngc-train --config recipes/countdown.yaml --eviction_rate 0.6 --output_dir outputs/ngc-0.6
    accelerate launch -m ngc_trl.train --config recipes/breadcrumbs_countdown.yaml   # Breadcrumbs

The ``method`` key (``ngc``, the default, or ``breadcrumbs``; YAML or ``--method``) is read first and
picks the config class: every field of `ScriptArguments`, `NGCConfig` (or `BreadcrumbsConfig`) and
`trl.ModelConfig` can be set in the YAML recipe or overridden on the command line after ``--config``.
Unknown YAML keys and invalid values fail while parsing, before any data or model is loaded.

Outputs in ``output_dir``: the model (or LoRA adapter) and tokenizer, ``ngc_settings.json`` (the eviction
schedule, read by ``ngc-eval`` and `ngc_trl.hub.load_ngc_settings`), ``ngc_training.json`` (curriculum,
loss switches, base model), a model card ``README.md`` and, with ``eval_after_train``, ``eval/``.
Breadcrumbs: ``output_dir`` holds the student (what you decode with; ``ngc_settings.json`` has
a `BeaconConfig`) and ``output_dir/teacher`` the teacher.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import AutoModelForCausalLM, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl import ScriptArguments as TrlScriptArguments

from ngc_trl.models import load_tokenizer
from ngc_trl.ngc.config import NGCConfig

logger = logging.getLogger(__name__)

METHODS = ("ngc", "breadcrumbs")


@dataclass
class ScriptArguments(TrlScriptArguments):
    """Data and evaluation arguments of an NGC run (`trl.ScriptArguments` plus the NGC-recipe fields).

    Parameters
    ----------
    method : str
        ``"ngc"`` (`NGCTrainer`) or ``"breadcrumbs"`` (`BreadcrumbsTrainer`); read before parsing
        (`read_method`) to pick the config class.
    task : str
        ``"countdown"``, ``"math"`` (DAPO-Math-17k for training), ``"linsys"`` or ``"stargraph"``.
    dataset_source : str
        ``"generated"`` (Countdown, LinSys, StarGraph: the built-in generator; math: the default
        DAPO-Math-17k source), ``"generated:<name>"`` (a named generator distribution, e.g. ``testbed``), a
        Hub dataset name or a local ``.jsonl``/``.json``/``.parquet`` file (Countdown and math).
        ``dataset_name`` is used when this is left at ``"generated"`` and ``dataset_name`` is set.
    num_train_problems : int, optional
        Keep the first N training problems (default: the loader's default / whole split).
    prompt_format : str
        ``"chat"`` (the tokenizer's chat template) or ``"plain"`` (a bare string; tiny char tokenizers).
    reward_format : float
        Reward of a well-formatted but wrong answer (one is extracted but does not verify; paper: 0).
    eval_after_train, eval_num_problems, eval_policies, eval_rates, eval_compression_ratios, eval_data_source
        A short `ngc_trl.evaluation.run.evaluate` on held-out problems after training, written to ``output_dir/eval``.
    curve_every, curve_num_problems, curve_policies, curve_batch_size, curve_max_new_tokens
        Method ``ngc``, generated tasks: a learning curve (`ngc_trl.evaluation.learning_curve.LearningCurveCallback`)
        every ``curve_every`` optimizer steps (0 = off) and at the end: greedy accuracy of
        ``curve_num_problems`` validation problems (the training distribution minus the training set, never
        the test split) for ``curve_policies`` at the final ``eviction_rate`` (``full`` at rate 0), with
        ``curve_max_new_tokens`` tokens (default ``max_completion_length``); ``output_dir/learning_curve.json``.
    """

    method: str = field(
        default="ngc", metadata={"help": "ngc | breadcrumbs (picks the trainer and its config)."}
    )
    task: str = field(default="countdown", metadata={"help": "countdown | math | linsys | stargraph"})
    dataset_source: str = field(
        default="generated",
        metadata={"help": "'generated', a Hub dataset name or a local .jsonl/.json/.parquet file."},
    )
    num_train_problems: int | None = field(
        default=None, metadata={"help": "Keep the first N training problems."}
    )
    prompt_format: str = field(default="chat", metadata={"help": "chat | plain"})
    reward_format: float = field(
        default=0.0, metadata={"help": "Reward of a formatted wrong answer (paper: 0)."}
    )
    eval_after_train: bool = field(default=False, metadata={"help": "Run a short ngc-eval after training."})
    eval_num_problems: int = field(
        default=64, metadata={"help": "Held-out problems of the final evaluation."}
    )
    eval_policies: str = field(default="full,ngc", metadata={"help": "Comma-separated policies to evaluate."})
    eval_rates: str = field(default="0.5", metadata={"help": "Comma-separated eviction rates to evaluate."})
    eval_compression_ratios: str = field(
        default="2,4,8,16,32",
        metadata={"help": "Breadcrumbs: comma-separated c of the 'breadcrumbs' policy's evaluation runs."},
    )
    eval_data_source: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation problems (generated tasks: default dataset_source's test split; math: e.g. aime25)."
        },
    )
    curve_every: int = field(
        default=0,
        metadata={
            "help": "Learning curve: evaluate on validation problems every N optimizer steps (0 = off)."
        },
    )
    curve_num_problems: int = field(
        default=64, metadata={"help": "Validation problems of the learning curve."}
    )
    curve_policies: str = field(
        default="ngc",
        metadata={"help": "Comma-separated policies of the learning curve ('full' runs at rate 0)."},
    )
    curve_batch_size: int = field(default=64, metadata={"help": "Sequences decoded together by the curve."})
    curve_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Completion budget of the curve (default: max_completion_length)."}
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ScriptArguments.method={self.method!r}: must be one of {', '.join(METHODS)}")
        from ngc_trl.tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"ScriptArguments.task={self.task!r}: must be one of {', '.join(TASKS)}")
        for name, split in (("dataset_source", "train"), ("eval_data_source", "test")):
            try:
                TASKS[self.task].check_source(getattr(self, name), split)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"ScriptArguments.{name}: {e}") from None
        if self.prompt_format not in ("chat", "plain"):
            raise ValueError(f"ScriptArguments.prompt_format={self.prompt_format!r}: must be chat or plain")
        if self.num_train_problems is not None and self.num_train_problems <= 0:
            raise ValueError(f"ScriptArguments.num_train_problems={self.num_train_problems}: must be > 0")
        if self.eval_num_problems <= 0:
            raise ValueError(f"ScriptArguments.eval_num_problems={self.eval_num_problems}: must be > 0")
        from ngc_trl.engine.config import BeaconConfig
        from ngc_trl.evaluation.run import plan_runs

        beacon = BeaconConfig(beacon_token_id=0) if self.method == "breadcrumbs" else None  # id known later
        try:
            plan_runs(self.eval_policies, self.eval_rates, beacon, self.eval_compression_ratios)
        except ValueError as e:
            raise ValueError(
                f"ScriptArguments.eval_policies/eval_rates/eval_compression_ratios: {e}"
            ) from None
        self._check_curve(plan_runs)

    def _check_curve(self, plan_runs) -> None:
        """Validate the learning-curve fields (errors name the field)."""
        for name in ("curve_num_problems", "curve_batch_size", "curve_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"ScriptArguments.{name}={value}: must be > 0")
        if self.curve_every < 0:
            raise ValueError(f"ScriptArguments.curve_every={self.curve_every}: must be >= 0 (0 = off)")
        try:
            plan_runs(self.curve_policies, "0.5")
        except ValueError as e:
            raise ValueError(f"ScriptArguments.curve_policies={self.curve_policies!r}: {e}") from None
        if self.curve_every == 0:
            return
        if self.method != "ngc":
            raise ValueError(
                f"ScriptArguments.curve_every={self.curve_every}: the learning curve runs with "
                "method 'ngc' only"
            )
        source = (
            self.dataset_name
            if self.dataset_source == "generated" and self.dataset_name
            else self.dataset_source
        )
        if self.task == "math" or not source.startswith("generated"):
            raise ValueError(
                f"ScriptArguments.curve_every={self.curve_every}: the learning curve needs a generated "
                f"task and dataset_source 'generated[:<name>]' (got task {self.task!r}, {source!r})"
            )


def read_method(argv: list[str] | None = None) -> str:
    """The run's ``method``, read before parsing: the last ``--method X`` / ``--method=X`` on the command
    line, else the ``method:`` key of the ``--config`` YAML, else ``"ngc"``. Unknown names raise."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    method = None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            method = argv[i + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    if method is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
        method = config.get("method") if isinstance(config, dict) else None
    method = method or "ngc"
    if method not in METHODS:
        raise ValueError(f"ScriptArguments.method={method!r}: must be one of {', '.join(METHODS)}")
    return method


def make_parser(method: str = "ngc") -> TrlParser:
    """The parser of ``ngc-train``: ``(ScriptArguments, NGCConfig, ModelConfig)``, or `BreadcrumbsConfig`
    in the middle for ``method="breadcrumbs"``."""
    if method == "breadcrumbs":
        from ngc_trl.breadcrumbs.config import BreadcrumbsConfig

        return TrlParser((ScriptArguments, BreadcrumbsConfig, ModelConfig))
    return TrlParser((ScriptArguments, NGCConfig, ModelConfig))


def load_train_dataset(script_args: ScriptArguments, seed: int = 0) -> datasets.Dataset:
    """The training problems with a ``prompt`` column and the reward's columns."""
    from ngc_trl.tasks import get_task

    task = get_task(script_args.task)
    source = script_args.dataset_source
    if source == "generated" and script_args.dataset_name:
        source = script_args.dataset_name
    n, fmt = script_args.num_train_problems, script_args.prompt_format
    if task.generated:
        return task.load(source, n=n, seed=seed, split="train", prompt_format=fmt)
    return task.load(source, n=n, split="train", prompt_format=fmt)  # math: fixed files, no seed


def make_reward(script_args: ScriptArguments):
    """The task's TRL reward function with ``reward_format``; its ``__name__`` is the task's reward name
    (``<task>_reward``), which TRL logs."""
    import functools

    from ngc_trl.tasks import get_task

    func = get_task(script_args.task).reward_func
    return functools.update_wrapper(functools.partial(func, format_reward=script_args.reward_format), func)


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m ngc_trl.train`` / ``ngc-train``; returns ``{"output_dir", "eval"}``."""
    # ------------------------------------------------------------------ parse (validates everything)
    script_args, training_args, model_args = make_parser(read_method(argv)).parse_args_and_config(argv)

    # ------------------------------------------------------------------ seed
    set_seed(training_args.seed)

    # ------------------------------------------------------------------ logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(f"Model parameters {model_args}")
    logger.info(f"Script parameters {script_args}")

    # ------------------------------------------------------------------ checkpoint detection
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")

    # ------------------------------------------------------------------ dataset
    train_dataset = load_train_dataset(script_args, seed=training_args.seed)
    logger.info(f"{len(train_dataset)} training problems ({script_args.task}, {script_args.dataset_source})")

    # ------------------------------------------------------------------ tokenizer
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if script_args.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt_format='chat' but {model_args.model_name_or_path} has no chat template; "
            "use --prompt_format plain"
        )

    # ------------------------------------------------------------------ model
    # 4-bit / 8-bit (QLoRA) needs bitsandbytes and a CUDA GPU: `pip install ngc-trl[gpu]`.
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    model_kwargs = dict(
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
    )
    if quantization_config is not None:
        from accelerate import PartialState

        model_kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    peft_config = get_peft_config(model_args)

    # ------------------------------------------------------------------ rewards
    reward_funcs = [make_reward(script_args)]

    # ------------------------------------------------------------------ trainer, settings, model card
    from ngc_trl.hub import write_model_card, write_ngc_settings

    if script_args.method == "breadcrumbs":
        trainer, eviction, card_kwargs, extra, forced_token_id = _breadcrumbs_setup(
            script_args, training_args, model_args, model, tokenizer, peft_config, train_dataset, reward_funcs
        )
    else:
        trainer, eviction, card_kwargs, extra, forced_token_id = _ngc_setup(
            script_args, training_args, model_args, model, tokenizer, peft_config, train_dataset, reward_funcs
        )
    card_kwargs["repo_id"] = training_args.hub_model_id if training_args.push_to_hub else None
    trl_create_model_card = trainer.create_model_card
    source = script_args.dataset_source
    hub_dataset = source if source != "generated" and not os.path.exists(source) else None
    card_args = dict(
        model_name=(training_args.hub_model_id or training_args.output_dir).rstrip("/").split("/")[-1],
        dataset_name=hub_dataset,
        tags=[script_args.method],
    )

    def create_model_card(
        *args, **kwargs
    ):  # TRL's card (also rewritten by push_to_hub) + the method's section
        trl_create_model_card(*args, **kwargs)
        if trainer.accelerator.is_main_process:
            write_model_card(training_args.output_dir, eviction, model_args.model_name_or_path, **card_kwargs)

    trainer.create_model_card = create_model_card

    # ------------------------------------------------------------------ train
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # ------------------------------------------------------------------ save model, settings, model card
    logger.info("*** Save model ***")
    trainer.save_model(training_args.output_dir)
    student = getattr(
        trainer, "student_model", None
    )  # Breadcrumbs full fine-tuning: output_dir holds the student
    decoder = student if student is not None else trainer.model
    if trainer.accelerator.is_main_process:
        extra.update(
            {
                "base_model": model_args.model_name_or_path,
                "task": script_args.task,
                "dataset_source": script_args.dataset_source,
                "prompt_format": script_args.prompt_format,
                "loss_type": training_args.loss_type,
                "use_peft": peft_config is not None,
            }
        )
        write_ngc_settings(training_args.output_dir, eviction, extra)
        trainer.create_model_card(**card_args)
        decoder.config.use_cache = True
        decoder.config.save_pretrained(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ evaluate
    summary = None
    if script_args.eval_after_train:
        from ngc_trl.evaluation.run import evaluate
        from ngc_trl.evaluation.setup import load_problems

        logger.info("*** Evaluate ***")
        data_source = script_args.eval_data_source
        if data_source is None and script_args.task != "math":
            data_source = script_args.dataset_source
        problems = load_problems(
            script_args.task,
            tokenizer,
            script_args.eval_num_problems,
            training_args.seed,
            data_source,
            prompt_format=script_args.prompt_format,
        )
        net = trainer.accelerator.unwrap_model(decoder).eval()
        if script_args.method == "breadcrumbs" and peft_config is not None:
            net.set_adapter(training_args.student_adapter_name)
        with torch.no_grad():
            summary = evaluate(
                net,
                tokenizer,
                problems,
                script_args.task,
                script_args.eval_policies,
                script_args.eval_rates,
                compression_ratios=script_args.eval_compression_ratios,
                eviction=eviction,
                max_new_tokens=training_args.max_completion_length,
                output_dir=os.path.join(training_args.output_dir, "eval"),
                interoception=getattr(training_args, "interoception_rates", None) is not None,
                forced_token_id=forced_token_id,
                settings={"model": training_args.output_dir},
                batch_size=training_args.per_device_train_batch_size,
            )

    # ------------------------------------------------------------------ push
    if training_args.push_to_hub:
        from ngc_trl.hub import safe_push

        logger.info("Pushing to hub...")
        safe_push(
            trainer,
            commit_message=f"End of {'NGC' if script_args.method == 'ngc' else 'Breadcrumbs'} training",
            **card_args,
        )
    return {"output_dir": training_args.output_dir, "eval": summary}


def _ngc_setup(
    script_args, training_args, model_args, model, tokenizer, peft_config, train_dataset, reward_funcs
):
    """`NGCTrainer` (with the optional meta token), its `EvictionConfig`, model-card kwargs, the settings'
    extras and the forced token id."""
    from ngc_trl.ngc.trainer import NGCTrainer

    # meta token (paper §A.4)
    meta_token_id = None
    if training_args.meta_token:
        from ngc_trl.engine.special_tokens import add_special_token

        meta_token_id = add_special_token(
            model, tokenizer, training_args.meta_token, training_args.meta_token_init
        )
        # Under LoRA the new row stays at its init (PEFT's trainable_token_indices wraps the tied lm_head,
        # which TRL's fused logits head cannot read); PEFT saves the resized embeddings with the adapter.
        logger.info(f"Meta token {training_args.meta_token!r} -> id {meta_token_id}")
    trainer = NGCTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if script_args.curve_every > 0:
        trainer.add_callback(_curve_callback(script_args, training_args, trainer, train_dataset))
    curriculum = None
    if training_args.curriculum_rates is not None:
        curriculum = {
            "rates": list(training_args.curriculum_rates),
            "stage_steps": training_args.curriculum_stage_steps,
            "alpha": training_args.curriculum_alpha,
        }
        if training_args.curriculum_gate is not None:
            curriculum.update(
                gate=training_args.curriculum_gate,
                gate_reference=training_args.curriculum_gate_reference,
                gate_ema=training_args.curriculum_gate_ema,
            )
    card_kwargs = dict(
        curriculum=curriculum,
        interoception_rates=training_args.interoception_rates,
        meta_token=training_args.meta_token,
        task=script_args.task,
        is_adapter=peft_config is not None,
    )
    extra = {
        "interoception_rates": training_args.interoception_rates,
        "meta_token": training_args.meta_token,
        "meta_token_id": meta_token_id,
        "meta_token_init": training_args.meta_token_init if meta_token_id is not None else None,
        "curriculum": curriculum,
        "eviction_loss_coef": training_args.eviction_loss_coef,
        "token_loss_coef": training_args.token_loss_coef,
        "greedy_rollout_tokens": training_args.greedy_rollout_tokens,
        "one_sampled_round": training_args.one_sampled_round,
        "replay_masks": training_args.replay_masks,
        "min_length_penalty": training_args.min_length_penalty,
    }
    return trainer, training_args.eviction_config(), card_kwargs, extra, meta_token_id


def _curve_callback(script_args, training_args, trainer, train_dataset):
    """The `LearningCurveCallback` of an NGC run: validation problems of the training distribution that
    are not in ``train_dataset`` (seeded apart from the training and test problems)."""
    from ngc_trl.evaluation.learning_curve import LearningCurveCallback, load_validation_problems

    source = script_args.dataset_source
    if source == "generated" and script_args.dataset_name:
        source = script_args.dataset_name
    problems = load_validation_problems(
        script_args.task,
        source,
        script_args.curve_num_problems,
        training_args.seed,
        exclude=train_dataset,
        prompt_format=script_args.prompt_format,
    )
    logger.info(f"Learning curve: {len(problems)} validation problems every {script_args.curve_every} steps")
    return LearningCurveCallback(
        trainer,
        problems,
        script_args.task,
        script_args.curve_every,
        policies=script_args.curve_policies,
        max_new_tokens=script_args.curve_max_new_tokens,
        batch_size=script_args.curve_batch_size,
    )


def _breadcrumbs_setup(
    script_args, training_args, model_args, model, tokenizer, peft_config, train_dataset, reward_funcs
):
    """`BreadcrumbsTrainer` (it adds the beacon token and builds the two adapters / the student copy), the
    student's `EvictionConfig`, model-card kwargs and the settings' extras."""
    from ngc_trl.breadcrumbs.trainer import BreadcrumbsTrainer

    trainer = BreadcrumbsTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    logger.info(f"Beacon {training_args.beacon_token!r} -> id {trainer.beacon_token_id}")
    card_kwargs = dict(task=script_args.task, is_adapter=peft_config is not None)
    return trainer, trainer.eviction_config(), card_kwargs, trainer.breadcrumbs_training_info(), None


if __name__ == "__main__":
    main()
