"""Fails loudly when a TRL / transformers upgrade changes a private hook NGCTrainer overrides."""

import inspect

from trl import GRPOTrainer

EXPECTED = {
    "_generate": ["self", "prompts"],
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                              "has_tool_images"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_compute_loss": ["self", "model", "inputs"],
}
LOGPS = ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
         "compute_aux_loss"]


def test_overridden_grpo_hooks_keep_their_signature():
    for name, params in EXPECTED.items():
        got = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert got == params, f"GRPOTrainer.{name} changed: {got}; update NGCTrainer.{name}"
    got = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert got[: len(LOGPS)] == LOGPS, f"_get_per_token_logps_and_entropies changed: {got}"


def test_every_ngc_override_exists_on_grpo_trainer():
    from ngc_trl.trainer import NGCTrainer

    for name, fn in vars(NGCTrainer).items():
        if name.startswith("_") and not name.startswith("__") and callable(fn) and name not in ("_group_rate", "_log_cache_stats"):
            assert hasattr(GRPOTrainer, name), f"NGCTrainer overrides {name}, which GRPOTrainer no longer has"


def test_pinned_versions():
    import transformers
    import trl

    assert trl.__version__.startswith("1.16."), trl.__version__
    assert transformers.__version__.startswith("5.23."), transformers.__version__
