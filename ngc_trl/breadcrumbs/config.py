"""`BreadcrumbsConfig`: TRL's `GRPOConfig` plus the Breadcrumbs fields (Monea et al., arXiv 2510.13797;
docs/method.md §8), validated in ``__post_init__``.

Every field is checked on construction (a ValueError names ``BreadcrumbsConfig.<field>``), and the
generation and kernel paths the student is not tested with are refused: vLLM (the vocabulary grows by the
beacon token), transformers paged / continuous-batching generation, and Liger kernels.

Deviations from / choices beyond the paper (docs/method.md §8 "Choices"): the KL direction and weight
(``kl_direction``, ``distill_loss_coef``), the beacon embedding init (``beacon_init``), ``c`` drawn per
rollout from a list (``compression_ratio`` as a list; not in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ngc_trl.breadcrumbs.beacons import BEACON_INITS, BEACON_TOKEN

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class BreadcrumbsConfig(GRPOConfig):
    r"""
    Configuration of [`BreadcrumbsTrainer`]: TRL's `GRPOConfig` (Dr. GRPO defaults, as `NGCConfig`) plus:

    New Parameters:
        compression_ratio (`int` or `list[int]`, defaults to `8`): ``c``, one beacon every ``c`` completion
            tokens (paper: one student per ``c ∈ {2, 4, 8, 16, 32}``). A list (CLI: ``--compression_ratio 4 8
            16``) draws ``c`` per rollout from it (not in the paper); its first entry is the decode default
            written to ``ngc_settings.json``.
        distill_loss_coef (`float`, defaults to `1.0`): weight of the distillation loss (0: the student is
            frozen and the KL is only logged).
        kl_direction (`str`, defaults to `"forward"`): ``"forward"`` = KL(teacher ‖ student), ``"reverse"`` =
            KL(student ‖ teacher).
        distill_chunk_size (`int`, defaults to `512`): tokens per chunk of the vocabulary-wide KL.
        student_learning_rate (`float` or `None`, defaults to `None`): peak learning rate of the student's
            parameters (their own optimizer groups, same schedule); ``None``: ``learning_rate``. Distillation is
            a supervised loss and tolerates the larger rates of SFT, while the teacher's RL step stays small.
        student_model_name_or_path (`str` or `None`, defaults to `None`): full fine-tuning only: start the
            student from this model (e.g. a beacon warm start, `ngc_trl.breadcrumbs.warm_start`; its tokenizer must map
            ``beacon_token`` to the teacher's beacon id) instead of a copy of the teacher. ``None``: the copy
            (the paper; ``"none"`` on the command line).
        beacon_token (`str`, defaults to `"<|beacon|>"`), beacon_init (`str`, defaults to `"mean"`): the
            special token and its embedding init (`ngc_trl.breadcrumbs.beacons.add_beacon_token`: mean | eos | random).
        teacher_adapter_name (`str`, defaults to `"teacher"`), student_adapter_name (`str`, defaults to
            `"student"`): the two LoRA adapters (LoRA only).
    """

    # list[int] so that the CLI takes one or several values; an int is kept as an int
    compression_ratio: list[int] = field(
        default=8, metadata={"help": "c (int), or several to draw per rollout."}
    )
    distill_loss_coef: float = field(
        default=1.0, metadata={"help": "Weight of the student's distillation loss."}
    )
    kl_direction: str = field(
        default="forward", metadata={"help": "forward = KL(teacher||student) | reverse"}
    )
    distill_chunk_size: int = field(
        default=512, metadata={"help": "Tokens per chunk of the vocabulary-wide KL."}
    )
    student_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the student (default: learning_rate)."}
    )
    student_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Full fine-tuning: start the student from this model (e.g. a beacon warm start), not a teacher copy."
        },
    )
    beacon_token: str = field(default=BEACON_TOKEN, metadata={"help": "The beacon special token."})
    beacon_init: str = field(default="mean", metadata={"help": "Beacon embedding init: mean | eos | random."})
    teacher_adapter_name: str = field(default="teacher", metadata={"help": "LoRA adapter of the teacher."})
    student_adapter_name: str = field(default="student", metadata={"help": "LoRA adapter of the student."})

    # Dr. GRPO defaults (as NGCConfig)
    loss_type: str = field(default="dr_grpo", metadata={"help": "TRL loss type of the teacher; Dr. GRPO."})
    scale_rewards: str = field(default="none", metadata={"help": "Dr. GRPO: no std scaling of advantages."})

    def __post_init__(self):
        super().__post_init__()

        def bad(name, why):
            raise ValueError(f"BreadcrumbsConfig.{name}={getattr(self, name)!r}: {why}")

        c = self.compression_ratio
        if isinstance(c, str):  # "4,8,16"
            try:
                c = [int(x) for x in c.split(",") if x.strip()]
            except ValueError:
                bad("compression_ratio", "must be an integer >= 2 or a list of them")
        if isinstance(c, (list, tuple)) and len(c) == 1:
            c = c[0]
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2  # noqa: E731
        if not (ok(c) or (isinstance(c, (list, tuple)) and c and all(ok(v) for v in c))):
            bad("compression_ratio", "must be an integer >= 2 or a non-empty list of them")
        self.compression_ratio = c if isinstance(c, int) else list(c)
        coef = self.distill_loss_coef
        if (
            isinstance(coef, bool)
            or not isinstance(coef, (int, float))
            or not coef >= 0
            or coef == float("inf")
        ):
            bad("distill_loss_coef", "must be a finite number >= 0")
        if self.kl_direction not in KL_DIRECTIONS:
            bad("kl_direction", f"must be one of {KL_DIRECTIONS}")
        lr = self.student_learning_rate
        if lr is not None and (
            isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")
        ):
            bad("student_learning_rate", "must be a finite number > 0, or None")
        if (
            isinstance(self.distill_chunk_size, bool)
            or not isinstance(self.distill_chunk_size, int)
            or self.distill_chunk_size <= 0
        ):
            bad("distill_chunk_size", "must be a positive integer")
        if not isinstance(self.beacon_token, str) or not self.beacon_token.strip():
            bad("beacon_token", "must be a non-empty string")
        if self.beacon_init not in BEACON_INITS:
            bad("beacon_init", f"must be one of {BEACON_INITS}")
        for name in ("teacher_adapter_name", "student_adapter_name"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or "." in v or v == "ref":
                bad(name, "must be a non-empty adapter name without '.' (and not 'ref')")
        if self.teacher_adapter_name == self.student_adapter_name:
            bad("student_adapter_name", "must differ from teacher_adapter_name")
        path = self.student_model_name_or_path
        if isinstance(path, str) and path.strip().lower() in ("none", "null"):  # the CLI's way to say None
            self.student_model_name_or_path = path = None
        if path is not None and (not isinstance(path, str) or not path.strip()):
            bad("student_model_name_or_path", "must be a model folder or Hub id, or None")
        if self.use_vllm:
            bad(
                "use_vllm",
                "not supported (the vocabulary grows by the beacon token; use transformers generation)",
            )
        for name in ("use_transformers_paged", "use_transformers_continuous_batching"):
            if getattr(self, name, False):
                bad(
                    name,
                    "not supported (the teacher's rollouts must suppress the beacon token, which only the "
                    "plain transformers generation path is tested to do)",
                )
        if self.use_liger_kernel:
            bad(
                "use_liger_kernel",
                "not supported (Liger patches the teacher when training starts but not the "
                "student copy, and the beacon replay has not been checked with its kernels)",
            )

    @property
    def compression_ratios(self) -> list[int]:
        """The ratios as a list (one entry for a fixed ``c``)."""
        c = self.compression_ratio
        return [c] if isinstance(c, int) else list(c)
