"""`NGCConfig`: TRL's `GRPOConfig` plus the NGC fields (and only those)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from ngc_trl.engine.config import EvictionConfig


@dataclass
class NGCConfig(GRPOConfig):
    r"""
    Configuration of [`NGCTrainer`]. Defaults give Dr. GRPO (`loss_type="dr_grpo"`, `scale_rewards="none"`)
    and the paper's Countdown schedule (δ = 256, ε = 0.5, b = 32, w = 5).

    New Parameters:
        > Eviction schedule and policy (see `EvictionConfig`)

        eviction_interval (`int`, defaults to `256`): δ, tokens (prompt included) between rounds.
        eviction_rate (`float`, defaults to `0.5`): ε, fraction of live blocks evicted per round and layer
            (the final rate when a curriculum is set).
        block_size (`int`, defaults to `32`): b, keys per block.
        score_window (`int`, defaults to `5`): w, recent queries whose attention scores the cache.
        eviction_policy (`str`, defaults to `"ngc"`): scorer used in rollouts; `"ngc"` is the learned policy
            (`"score_head"`, not in the paper: a separate learned head attached to the model,
            `ngc_trl.policies.score_head`).
        score_head_learning_rate (`float` or `None`, defaults to `None`): not in the paper; the scoring
            head's own learning rate (``None``: ``learning_rate``).
        protect_prompt (`bool`, defaults to `False`), num_sink (`int`, defaults to `0`), num_recent
            (`int`, defaults to `0`): protections, off in the paper.
        block_reduction (`str`, defaults to `"mean"`): per-key to block score (paper: mean).
        eviction_logit_scale (`float`, defaults to `1.0`), eviction_logit_transform (`str`, defaults to
            `"none"`): block score → Plackett–Luce logit (paper: raw mean, scale 1).

        > Loss

        eviction_loss_coef (`float`, defaults to `1.0`): weight of L_mem (0: token log-probs only).
        token_loss_coef (`float`, defaults to `1.0`): weight of TRL's token loss (beyond the paper, a
            diagnostic: 0 trains the eviction policy alone, the "eviction-only" ablation; the paper trains
            both with weight 1).
        greedy_rollout_tokens (`bool`, defaults to `False`): beyond the paper. Rollouts decode their tokens
            greedily and sample only the evictions (Gumbel-top-k), so the eviction draws are the only
            randomness in a group and every reward difference within it is due to what was evicted: a
            lower-variance L_mem, trained under the decoding it is evaluated with (greedy). The token loss of
            greedy tokens is no policy gradient, so it needs `token_loss_coef=0` (the paper samples both).
        one_sampled_round (`int`, defaults to `0`): beyond the paper. 0: every round's evictions are sampled
            (paper). k ≥ 1: each prompt group samples its evictions at one round drawn uniformly from its first
            k and keeps the top-k (what evaluation does) at every other round; L_mem is taken over that round's
            actions only. With `greedy_rollout_tokens` a group's rollouts share their prefix up to that round and
            differ only by its draw: each reward difference is credited to one decision per layer.
        replay_masks (`bool`, defaults to `True`): per-layer replay masks in the training forward (False:
            "targeted KV dropout", tokens scored on the full context).
        replay_backend (`str`, defaults to `"auto"`): `"dense"` SDPA masks, `"flex"` FlexAttention, or auto.
        replay_chunk_tokens (`int`, defaults to `0`): run the replay forward in length-sorted chunks of at most
            this many padded tokens, each trimmed to its longest row (0: one chunk per micro-batch). Exact.
        min_length_penalty (`bool`, defaults to `False`): reward 0 for rollouts that never reached a round
            (the paper's DAPO-Math setting).

        > Curriculum (Eq. 6)

        curriculum_rates (`list[float]` or `None`): ε levels ε_0 ≤ … ≤ ε_K; None = constant `eviction_rate`.
        curriculum_stage_steps (`int`, defaults to `20`): Δ, steps per stage.
        curriculum_alpha (`float`, defaults to `0.6`): α, share of a stage spent ramping.
        curriculum_gate (`float` or `None`, defaults to `None`): beyond the paper. None = the paper's
            time-driven Eq. 6. g in (0, 1]: the staircase's stage clock advances only over steps trained on
            rollout batches whose mean reward is >= g × the reference reward, and holds otherwise (see
            `ngc_trl.ngc.curriculum.GatedCurriculum`). Needs `curriculum_rates`.
        curriculum_gate_reference (`float` or `None`, defaults to `None`): the reference reward, a fixed
            full-cache reward measured once (> 0). None: the EMA of the batch rewards at the lowest level
            `curriculum_rates[0]` (put 0 there for a reward truly without eviction).
        curriculum_gate_ema (`float`, defaults to `0.9`): decay in [0, 1) of that EMA (bias-corrected).

        > Budget-aware interoception (§5.3)

        interoception_rates (`list[float]` or `None`): if set, each prompt group draws one ε from this set
            and the tag `<eviction_rate>{ε%}</eviction_rate>` is appended to its prompt.

        > Meta-token (§A.4)

        meta_token (`str` or `None`): a special token forced just before every round (added to the tokenizer
            by the entry point, embedding initialised to the mean of `meta_token_init`'s tokens).
        meta_token_init (`str`, defaults to `"tl;dr"`).
    """

    eviction_interval: int = field(
        default=256, metadata={"help": "δ: tokens (prompt included) between eviction rounds."}
    )
    eviction_rate: float = field(
        default=0.5, metadata={"help": "ε: fraction of live blocks evicted per round and layer."}
    )
    block_size: int = field(default=32, metadata={"help": "b: keys per eviction block."})
    score_window: int = field(
        default=5, metadata={"help": "w: recent queries whose attention scores the cache."}
    )
    eviction_policy: str = field(
        default="ngc", metadata={"help": "Scoring rule of rollouts ('ngc' is learned)."}
    )
    score_head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Not in the paper: learning rate of the scoring head of eviction_policy='score_head' "
            "(its own optimizer group); None: learning_rate."
        },
    )
    protect_prompt: bool = field(
        default=False, metadata={"help": "Never evict prompt entries (not in the paper)."}
    )
    num_sink: int = field(default=0, metadata={"help": "Never evict the first N entries (not in the paper)."})
    num_recent: int = field(
        default=0, metadata={"help": "Never evict the N newest entries (not in the paper)."}
    )
    block_reduction: str = field(
        default="mean", metadata={"help": "Key-to-block score reduction: mean|max|sum."}
    )
    eviction_logit_scale: float = field(
        default=1.0, metadata={"help": "Multiplier of block scores used as logits."}
    )
    eviction_logit_transform: str = field(
        default="none",
        metadata={"help": "'none' (paper), 'log' or 'relative' (score / mean candidate score)."},
    )
    eviction_loss_coef: float = field(
        default=1.0, metadata={"help": "Weight of the eviction policy-gradient loss."}
    )
    token_loss_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the token loss (beyond the paper; 0: train the eviction policy alone)."},
    )
    greedy_rollout_tokens: bool = field(
        default=False,
        metadata={
            "help": "Beyond the paper: decode rollout tokens greedily, sample only the evictions "
            "(needs token_loss_coef=0)."
        },
    )
    one_sampled_round: int = field(
        default=0,
        metadata={
            "help": "Beyond the paper: k >= 1 samples the evictions of one round per group (drawn from the "
            "first k), top-k at the others; 0: every round sampled (paper)."
        },
    )
    replay_masks: bool = field(
        default=True, metadata={"help": "Per-layer replay masks in the training forward."}
    )
    replay_backend: str = field(default="auto", metadata={"help": "'dense', 'flex' or 'auto'."})
    replay_chunk_tokens: int = field(
        default=0,
        metadata={
            "help": "Replay forward in length-sorted chunks of at most this many padded tokens (rows x length), each "
            "trimmed to its longest row; 0: one chunk per micro-batch (still trimmed). Exact either way."
        },
    )
    min_length_penalty: bool = field(
        default=False, metadata={"help": "Reward 0 when no eviction round fired."}
    )
    curriculum_rates: list[float] | None = field(
        default=None, metadata={"help": "ε levels of the Eq. 6 staircase."}
    )
    curriculum_stage_steps: int = field(default=20, metadata={"help": "Δ: steps per curriculum stage."})
    curriculum_alpha: float = field(default=0.6, metadata={"help": "α: share of a stage spent ramping."})
    curriculum_gate: float | None = field(
        default=None,
        metadata={
            "help": "Beyond the paper: advance the curriculum only while reward >= gate × reference (None: Eq. 6)."
        },
    )
    curriculum_gate_reference: float | None = field(
        default=None,
        metadata={
            "help": "Fixed full-cache reference reward of the gate (None: EMA of rewards at curriculum_rates[0])."
        },
    )
    curriculum_gate_ema: float = field(default=0.9, metadata={"help": "Decay of the gate's reference EMA."})
    interoception_rates: list[float] | None = field(
        default=None, metadata={"help": "Rates drawn per prompt group and written into the prompt."}
    )
    meta_token: str | None = field(
        default=None, metadata={"help": "Special token forced before every round."}
    )
    meta_token_init: str = field(
        default="tl;dr", metadata={"help": "Text whose mean embedding initialises it."}
    )

    # Dr. GRPO defaults
    loss_type: str = field(default="dr_grpo", metadata={"help": "TRL loss type; NGC uses Dr. GRPO."})
    scale_rewards: str = field(default="none", metadata={"help": "Dr. GRPO: no std scaling of advantages."})

    def __post_init__(self):
        super().__post_init__()
        self.eviction_config()  # validates every eviction field, naming it
        self._check_trl_options()
        if self.eviction_loss_coef < 0:
            raise ValueError(f"NGCConfig.eviction_loss_coef={self.eviction_loss_coef}: must be >= 0")
        if self.token_loss_coef < 0:
            raise ValueError(f"NGCConfig.token_loss_coef={self.token_loss_coef}: must be >= 0")
        if self.token_loss_coef == 0 and (self.eviction_loss_coef == 0 or not self._learned_policy()):
            raise ValueError(
                "NGCConfig.token_loss_coef=0 trains the eviction policy alone: it needs a learned "
                "eviction_policy ('ngc' or 'score_head') and eviction_loss_coef > 0, or nothing is trained"
            )
        if self.greedy_rollout_tokens and self.token_loss_coef != 0:
            raise ValueError(
                f"NGCConfig.greedy_rollout_tokens=True with token_loss_coef={self.token_loss_coef}: greedy tokens "
                "are not sampled, so their log-probs carry no policy gradient; set token_loss_coef=0 "
                "(the eviction policy alone is trained)"
            )
        if (
            isinstance(self.one_sampled_round, bool)
            or not isinstance(self.one_sampled_round, int)
            or (self.one_sampled_round < 0)
        ):
            raise ValueError(
                f"NGCConfig.one_sampled_round={self.one_sampled_round!r}: must be an integer >= 0"
            )
        if self.one_sampled_round and self.eviction_loss_coef == 0:
            raise ValueError(
                "NGCConfig.one_sampled_round: it only changes which eviction actions L_mem trains on; "
                "it needs eviction_loss_coef > 0"
            )
        if (
            isinstance(self.replay_chunk_tokens, bool)
            or not isinstance(self.replay_chunk_tokens, int)
            or self.replay_chunk_tokens < 0
        ):
            raise ValueError(
                f"NGCConfig.replay_chunk_tokens={self.replay_chunk_tokens!r}: must be an integer >= 0"
            )
        if self.replay_backend not in ("auto", "dense", "flex"):
            raise ValueError(f"NGCConfig.replay_backend={self.replay_backend!r}: must be auto, dense or flex")
        for name in ("curriculum_rates", "interoception_rates"):
            rates = getattr(self, name)
            if rates is None:
                continue
            if isinstance(rates, str):  # CLI: "0.1,0.2"
                rates = [float(x) for x in rates.split(",") if x.strip()]
                setattr(self, name, rates)
            if not rates or any(not 0.0 <= float(r) < 1.0 for r in rates):
                raise ValueError(f"NGCConfig.{name}={rates}: need a non-empty list of rates in [0, 1)")
        if self.curriculum_rates is not None:
            if any(a > b for a, b in zip(self.curriculum_rates, self.curriculum_rates[1:])):
                raise ValueError(
                    f"NGCConfig.curriculum_rates={self.curriculum_rates}: must be non-decreasing"
                )
            if self.interoception_rates is not None:
                raise ValueError("NGCConfig.curriculum_rates and interoception_rates cannot both be set")
        if self.curriculum_stage_steps <= 0:
            raise ValueError(f"NGCConfig.curriculum_stage_steps={self.curriculum_stage_steps}: must be > 0")
        if not 0.0 < self.curriculum_alpha <= 1.0:
            raise ValueError(f"NGCConfig.curriculum_alpha={self.curriculum_alpha}: must be in (0, 1]")
        self._check_curriculum_gate()
        from ngc_trl.policies import POLICIES

        if POLICIES.get(self.eviction_policy) is not None and POLICIES[self.eviction_policy].hindsight:
            raise ValueError(
                f"NGCConfig.eviction_policy={self.eviction_policy!r}: an evaluation-only hindsight "
                "policy (it reads the full-cache completion); rollouts cannot use it"
            )
        if self.eviction_loss_coef > 0 and not self._learned_policy():
            raise ValueError(
                f"NGCConfig.eviction_policy={self.eviction_policy!r}: the eviction loss trains a learned scorer "
                "('ngc' or 'score_head'); set eviction_loss_coef=0 to roll out with a heuristic"
            )
        if self.score_head_learning_rate is not None and (
            self.eviction_policy != "score_head" or not self.score_head_learning_rate > 0
        ):
            raise ValueError(
                f"NGCConfig.score_head_learning_rate={self.score_head_learning_rate}: must be > 0, and only "
                "with eviction_policy='score_head' (the head it sets the learning rate of)"
            )

    def _learned_policy(self) -> bool:
        from ngc_trl.policies import POLICIES

        cls = POLICIES.get(self.eviction_policy)
        return cls is not None and cls.learned

    # TRL options the evicting rollouts or L_mem cannot honour (each would crash or be silently ignored)
    LOSS_TYPES = ("dr_grpo", "grpo", "bnpo", "dapo")  # the clipped-ratio surrogates L_mem shares

    def _check_trl_options(self) -> None:
        """Refuse the GRPOConfig options NGC does not support, naming the field. Everything else TRL offers
        (``num_iterations``, ``steps_per_generation``, ``generation_batch_size``, ``mask_truncated_completions``,
        ``importance_sampling_level``, ``delta``, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
        ``entropy_coef``, ``beta``, ``cast_lm_head_to_fp32``, ...) works with NGC and is tested."""

        def no(name, why):
            raise ValueError(f"NGCConfig.{name}={getattr(self, name)!r} is not supported: {why}")

        decode = "the evicting decode loop samples with temperature, top_p and top_k only"
        if self.use_vllm:
            no("use_vllm", "vLLM cannot evict from its paged cache; rollouts need the evicting decode loop")
        for name in ("use_transformers_paged", "use_transformers_continuous_batching"):
            if getattr(self, name, False):
                no(
                    name,
                    "rollouts need the evicting decode loop, not transformers' paged / continuous batching",
                )
        if self.generation_kwargs:
            no("generation_kwargs", decode)
        if self.min_p is not None:
            no("min_p", decode)
        if self.repetition_penalty != 1.0:
            no("repetition_penalty", decode)
        if self.cache_implementation is not None:
            no("cache_implementation", "the evicting decode loop keeps its own per-layer cache")
        if self.loss_type not in self.LOSS_TYPES:
            no(
                "loss_type",
                f"L_mem is the clipped-ratio surrogate of {self.LOSS_TYPES} (the paper: dr_grpo); "
                "cispo / sapo / vespo / luspo define no eviction-action loss here",
            )
        if self.use_liger_kernel:
            no(
                "use_liger_kernel",
                "Liger's kernels patch the model when training starts, and neither the evicting "
                "rollout nor the replay parity has been checked with them",
            )

    def _check_curriculum_gate(self) -> None:
        """Validate the reward-gated curriculum fields (errors name the field)."""
        gate, ref = self.curriculum_gate, self.curriculum_gate_reference
        if gate is not None:
            if not (isinstance(gate, (int, float)) and 0.0 < gate <= 1.0):
                raise ValueError(f"NGCConfig.curriculum_gate={gate}: must be None or in (0, 1]")
            if self.curriculum_rates is None:
                raise ValueError("NGCConfig.curriculum_gate: needs curriculum_rates (the staircase it gates)")
        if ref is not None:
            if gate is None:
                raise ValueError(
                    "NGCConfig.curriculum_gate_reference: only used with curriculum_gate; set both"
                )
            if not (isinstance(ref, (int, float)) and math.isfinite(ref) and ref > 0):
                raise ValueError(f"NGCConfig.curriculum_gate_reference={ref}: must be a finite reward > 0")
        if not (isinstance(self.curriculum_gate_ema, (int, float)) and 0.0 <= self.curriculum_gate_ema < 1.0):
            raise ValueError(f"NGCConfig.curriculum_gate_ema={self.curriculum_gate_ema}: must be in [0, 1)")

    def eviction_config(self) -> EvictionConfig:
        """The `EvictionConfig` of rollouts (errors name the `EvictionConfig` field)."""
        return EvictionConfig(
            eviction_interval=self.eviction_interval,
            eviction_rate=self.eviction_rate,
            block_size=self.block_size,
            score_window=self.score_window,
            policy=self.eviction_policy,
            protect_prompt=self.protect_prompt,
            num_sink=self.num_sink,
            num_recent=self.num_recent,
            block_reduction=self.block_reduction,
            logit_scale=self.eviction_logit_scale,
            logit_transform=self.eviction_logit_transform,
        )
