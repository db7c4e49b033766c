"""Fails loudly when a TRL / transformers / PEFT upgrade changes a private hook NGCTrainer or
BreadcrumbsTrainer overrides (or an internal the Breadcrumbs adapter switch relies on)."""

import inspect

from trl import GRPOTrainer

EXPECTED = {
    "_generate": ["self", "prompts"],
    "_generate_single_turn": [
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ],
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_compute_loss": ["self", "model", "inputs"],
}
# BreadcrumbsTrainer (transformers.Trainer hooks, inherited by GRPOTrainer)
BREADCRUMBS_EXPECTED = {
    "_compute_loss": ["self", "model", "inputs"],
    "create_optimizer": ["self", "model"],
    "_clip_grad_norm": ["self", "model"],
    "_save": ["self", "output_dir", "state_dict"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
}
LOGPS = [
    "self",
    "model",
    "input_ids",
    "attention_mask",
    "logits_to_keep",
    "batch_size",
    "compute_entropy",
    "compute_aux_loss",
]


def test_overridden_grpo_hooks_keep_their_signature():
    for name, params in EXPECTED.items():
        got = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert got == params, f"GRPOTrainer.{name} changed: {got}; update NGCTrainer.{name}"
    got = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert got[: len(LOGPS)] == LOGPS, f"_get_per_token_logps_and_entropies changed: {got}"


def test_every_ngc_override_exists_on_grpo_trainer():
    from ngc_trl.ngc.trainer import NGCTrainer

    for name, fn in vars(NGCTrainer).items():
        if (
            name.startswith("_")
            and not name.startswith("__")
            and callable(fn)
            and name not in ("_group_rate", "_log_cache_stats", "_open_scope", "_draw_sampled_rounds")
        ):
            assert hasattr(GRPOTrainer, name), f"NGCTrainer overrides {name}, which GRPOTrainer no longer has"


def test_pinned_versions():
    import transformers
    import trl

    assert trl.__version__.startswith("1.16."), trl.__version__
    assert transformers.__version__.startswith("5.23."), transformers.__version__


def test_overridden_breadcrumbs_hooks_keep_their_signature():
    for name, params in BREADCRUMBS_EXPECTED.items():
        got = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert got == params, f"GRPOTrainer.{name} changed: {got}; update BreadcrumbsTrainer.{name}"


def test_beacon_sft_overrides_only_sft_compute_loss_with_its_signature():
    from trl import SFTTrainer

    from ngc_trl.breadcrumbs.warm_start import BeaconSFTTrainer

    got = list(inspect.signature(SFTTrainer.compute_loss).parameters)
    assert got == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"], (
        f"SFTTrainer.compute_loss: {got}"
    )
    assert {n for n, f in vars(BeaconSFTTrainer).items() if callable(f) and not n.startswith("__")} == {
        "compute_loss"
    }


def test_every_breadcrumbs_override_exists_on_grpo_trainer():
    from ngc_trl.breadcrumbs.trainer import BreadcrumbsTrainer

    helpers = ("_set_adapter_grads", "_student", "_teacher_modules", "_draw_ratios", "_load_student")
    for name, fn in vars(BreadcrumbsTrainer).items():
        if name.startswith("_") and not name.startswith("__") and callable(fn) and name not in helpers:
            assert hasattr(GRPOTrainer, name), (
                f"BreadcrumbsTrainer overrides {name}, which GRPOTrainer no longer has"
            )
        if (
            not name.startswith("_")
            and callable(fn)
            and name not in ("eviction_config", "breadcrumbs_training_info")
        ):
            assert hasattr(GRPOTrainer, name), (
                f"BreadcrumbsTrainer overrides {name}, which GRPOTrainer no longer has"
            )


def test_internals_of_the_breadcrumbs_adapter_switch():
    """The student's recompute under gradient checkpointing is pinned by wrapping each layer's
    `_gradient_checkpointing_func` and setting PEFT's per-layer `_active_adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert "self._gradient_checkpointing_func(" in inspect.getsource(GradientCheckpointingLayer)
    assert "self._active_adapter" in inspect.getsource(BaseTunerLayer)
