"""Every invalid EvictionConfig value fails early with the field named; schedule helpers."""

import pytest

from ngc_trl import EvictionConfig


@pytest.mark.parametrize(
    "field,value",
    [
        ("eviction_interval", 0),
        ("eviction_interval", -3),
        ("eviction_interval", 2.5),
        ("eviction_rate", 1.0),
        ("eviction_rate", -0.1),
        ("eviction_rate", "half"),
        ("block_size", 0),
        ("score_window", 0),
        ("policy", "lru"),
        ("num_sink", -1),
        ("num_recent", 1.5),
        ("block_reduction", "median"),
        ("logit_scale", 0.0),
        ("logit_scale", float("nan")),
        ("logit_transform", "exp"),
        ("window_size", 0),
        ("protect_prompt", "yes"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EvictionConfig(**{field: value})


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="ngc"):
        EvictionConfig(policy="nope")


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown fields"):
        EvictionConfig.from_dict({"eviction_interval": 4, "evil": 1})
    assert EvictionConfig.from_dict(EvictionConfig(eviction_interval=7).to_dict()).eviction_interval == 7


def test_kept_blocks_rounding():
    cfg = EvictionConfig()
    assert cfg.num_kept_blocks(10, 0.5) == 5
    assert cfg.num_kept_blocks(9, 0.5) == 5  # ceil
    assert cfg.num_kept_blocks(10, 0.7) == 3  # no float noise (0.3 * 10 = 3.0000000000000004)
    assert cfg.num_kept_blocks(1, 0.9) == 1  # at least one
    assert cfg.num_kept_blocks(4, 0.0) == 4


def test_round_positions_count_the_prompt():
    cfg = EvictionConfig(eviction_interval=8)
    assert cfg.round_positions(prompt_length=5, total_length=30) == [8, 16, 24]
    assert cfg.round_positions(prompt_length=5, total_length=25) == [8, 16]  # last token is never fed
    assert cfg.round_positions(prompt_length=12, total_length=30) == [
        12,
        16,
        24,
    ]  # long prompt: after prefill
    assert cfg.round_positions(prompt_length=16, total_length=30) == [16, 24]
