"""The task interface: one class per task with its data, prompt, answer parser and verifier.

:class:`Task` is what training, evaluation and the testbed see. A task object

* loads a split as a ``datasets.Dataset`` with a ``prompt`` column and the task's instance columns
  (:attr:`Task.columns`): :meth:`Task.load`;
* builds the prompt of one dataset row: :meth:`Task.build_prompt`;
* extracts the final answer from a completion with a bounded, linear-time scan (model output is
  untrusted: nothing is ever evaluated): :meth:`Task.extract_answer`;
* verifies an extracted answer against a row: :meth:`Task.verify`;
* scores a completion against a row, ``score(text, row) -> float``, the RL reward and the evaluation's
  correctness at once, so the two cannot disagree (nanochat's "task = prompt + verifier"):
  :meth:`Task.score`;
* gives TRL its reward function, :attr:`Task.reward_func` (a picklable :class:`TaskReward`, named
  ``<task>_reward``, which is the name TRL logs), reading the instance columns TRL passes as keywords.

:class:`GeneratedTask` adds what the generated tasks (Countdown, LinSys, StarGraph) share: named generator
distributions (``"generated"`` = ``"generated:standard"``, ``"generated:<name>"``), the train/test split
loader, chat and plain prompts around a task-specific message, and the ``<answer>...</answer>`` parser.
A dataset *row* is any mapping holding the instance columns (extra keys such as ``prompt`` or ``id`` are
ignored).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

PREFILL = "Let me solve this step by step.\n<think>"
PROMPT_FORMATS = ("chat", "plain")
GENERATED_TRAIN_ROWS = 10_000  # default size of a generated train split
GENERATED_TEST_ROWS = 1_024  # default size of a generated test split


# ----------------------------------------------------------------------------- shared helpers
def chat_messages(
    content: str,
    eviction_rate_tag: str | None = None,
    prefill: bool = False,
    system_prompt: str | None = None,
) -> list[dict]:
    """A task's user ``content`` as chat messages: the interoception tag appended, an optional system
    turn first and the assistant prefill (:data:`PREFILL`) last."""
    if eviction_rate_tag:
        content += " " + eviction_rate_tag
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    if prefill:
        messages.append({"role": "assistant", "content": PREFILL})
    return messages


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a chat list whose last message's content is used."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else ""
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    return ""


def last_answer_tag(text: Any, max_chars: int) -> str | None:
    """Content of the last ``<answer>...</answer>``, stripped; ``None`` if absent, not a string, or the
    content is over ``max_chars`` characters.

    Linear-time ``str.rfind`` scans only (no regex), safe on completions of any length: the opening tag is
    looked for only within ``max_chars`` characters before the last closing tag (nested tags: the
    innermost).
    """
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", max(0, end - max_chars - len("<answer>")), end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def _choices(values: Sequence[str]) -> str:
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# ----------------------------------------------------------------------------- the interface
class TaskReward:
    """A task's TRL reward function: ``reward(prompts, completions, format_reward=0.0, **columns)``.

    ``completions`` are strings or chat lists (the last message's content is scored); ``columns`` holds
    (at least) the task's instance columns, one list entry per completion, as TRL passes the dataset's
    columns; other keywords (``completion_ids``, ``trainer_state``, ...) are ignored. Returns one
    :meth:`Task.score` per completion. A callable object rather than a closure so that it pickles; its
    ``__name__`` (``"<task>_reward"``) is what TRL logs the reward under.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.__name__ = self.__qualname__ = f"{task.name}_reward"

    def __call__(self, prompts, completions, format_reward: float = 0.0, **columns) -> list[float]:
        missing = [c for c in self.task.columns if c not in columns]
        if missing:
            raise ValueError(f"{self.__name__}: the dataset has no column {missing[0]!r}")
        rows = [
            dict(zip(self.task.columns, values)) for values in zip(*(columns[c] for c in self.task.columns))
        ]
        return [self.task.score(completion_text(c), row, format_reward) for c, row in zip(completions, rows)]

    def __repr__(self) -> str:
        return f"<reward function {self.__name__}>"


class Task(abc.ABC):
    """One task: its data, prompt, bounded answer parser and verifier (module docstring).

    Class attributes: ``name`` (the registry name, :data:`ngc_trl.tasks.TASKS`), ``columns`` (the instance
    columns of a dataset row, read by :meth:`verify` and passed by TRL to :attr:`reward_func`) and
    ``generated`` (whether the task has a generator, :class:`GeneratedTask`).
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    generated: ClassVar[bool] = False

    @abc.abstractmethod
    def load(self, source: str | None = None, n: int | None = None, *, split: str = "train", **options):
        """A split of the task as a ``datasets.Dataset`` with a ``prompt`` column (chat messages or a plain
        string, ``prompt_format="chat"`` or ``"plain"``) and the instance :attr:`columns`; the first ``n``
        rows when ``n`` is given. ``options`` are the task's (generated tasks: ``seed``, ``prefill``, ...)."""

    @abc.abstractmethod
    def build_prompt(self, row: Mapping[str, Any], **options) -> list[dict]:
        """The chat messages asking for the solution of the instance ``row``."""

    @abc.abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The final answer of a completion ``text``, or ``None``; bounded and linear-time, never evaluates."""

    @abc.abstractmethod
    def verify(self, answer: str, row: Mapping[str, Any]) -> bool:
        """Whether the extracted ``answer`` solves the instance ``row``; never raises on ``answer``."""

    @abc.abstractmethod
    def check_source(self, source: str | None, split: str = "train") -> None:
        """Fail early (``ValueError``) on a data source that :meth:`load` cannot read for ``split``; ``None``
        (the default source) passes."""

    def score(self, text: str, row: Mapping[str, Any], format_reward: float = 0.0) -> float:
        """1.0 if the completion's final answer verifies against ``row``, ``format_reward`` if an answer is
        present but wrong, else 0.0.

        TinyZero uses ``format_reward=0.1`` for Countdown; the NGC paper reports plain accuracy (the default).
        """
        answer = self.extract_answer(text)
        if answer is None:
            return 0.0
        return 1.0 if self.verify(answer, row) else float(format_reward)

    @functools.cached_property
    def reward_func(self) -> TaskReward:
        """The TRL reward function of the task (:class:`TaskReward`), one object per task."""
        return TaskReward(self)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class GeneratedTask(Task):
    """A task with a seeded generator, hash-disjoint train/test splits and ``<answer>``-tag answers.

    Subclasses set ``distributions`` (named generator settings, ``"standard"`` first), ``max_answer_chars``,
    and implement :meth:`generate`, :meth:`prompt_content` (the chat user message), :meth:`plain_line` (the
    first line of the plain prompt), :meth:`verify` and :meth:`instance_key`.
    """

    generated = True
    distributions: ClassVar[dict[str, dict[str, Any]]]
    max_answer_chars: ClassVar[int] = 200
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    reads_sources: ClassVar[bool] = False  # whether :meth:`read` takes non-generated sources

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def generate(self, n: int, seed: int, *, split: str | None = None, **ranges: Any) -> list[dict]:
        """``n`` instances, deterministically for ``seed`` (instance ``i`` depends only on the seed), of the
        hash split ``split`` (``None``: both), drawn with the generator ``ranges``."""

    @abc.abstractmethod
    def prompt_content(self, row: Mapping[str, Any]) -> str:
        """The user message of the chat prompt of instance ``row`` (without the interoception tag)."""

    @abc.abstractmethod
    def plain_line(self, row: Mapping[str, Any]) -> str:
        """The first line of the plain prompt of instance ``row`` (the tag and ``\\n<think>`` follow)."""

    @abc.abstractmethod
    def instance_key(self, row: Mapping[str, Any]) -> tuple:
        """A hashable identity of the instance, invariant to the orders that do not change it."""

    def instance(self, row: Mapping[str, Any]) -> dict:
        """The instance columns of ``row`` as a dict (what a loaded dataset stores per row)."""
        return {c: row[c] for c in self.columns}

    def generator_options(self, name: str, split: str, ranges: dict[str, Any]) -> dict[str, Any]:
        """The generator keywords of split ``split`` of distribution ``name``, given its ``ranges``."""
        return ranges

    def read(self, source: str, n: int | None, split: str) -> list[dict]:
        """Instances from a non-generated ``source`` (tasks with ``reads_sources``); ``ValueError`` here."""
        raise ValueError(
            f"task {self.name!r}: data source must be 'generated' or 'generated:<name>', got {source!r}"
        )

    # ------------------------------------------------------------------ sources
    @staticmethod
    def is_generated(source: str) -> bool:
        """Whether ``source`` names the generator (``"generated"`` or ``"generated:<name>"``)."""
        return source == "generated" or source.startswith("generated:")

    def distribution(self, source: str = "generated") -> dict[str, Any]:
        """The generator ranges that ``source`` (``"generated"`` = ``"generated:standard"``, or
        ``"generated:<name>"``) names in :attr:`distributions`; ``ValueError`` naming the valid ones."""
        if not self.is_generated(source):
            raise ValueError(
                f"task {self.name!r}: data source must be 'generated' or 'generated:<name>', got {source!r}"
            )
        key = source.partition(":")[2] or "standard"
        if key not in self.distributions:
            raise ValueError(
                f"unknown {self.name} distribution {key!r} in source {source!r}; "
                f"valid: {', '.join('generated:' + k for k in self.distributions)}"
            )
        return dict(self.distributions[key])

    def check_source(self, source: str | None, split: str = "train") -> None:
        """Fail early (``ValueError``) on an unknown ``"generated:<name>"`` distribution, or on anything but
        the generator for a task that reads no other source (one that does checks it when it loads)."""
        if source is None:
            return
        if source.startswith("generated") or not self.reads_sources:
            self.distribution(source)

    # ------------------------------------------------------------------ data
    def load(
        self,
        source: str = "generated",
        n: int | None = None,
        *,
        seed: int = 0,
        split: str = "train",
        prompt_format: str = "chat",
        prefill: bool = True,
        eviction_rate_tag: str | None = None,
        **ranges: Any,
    ):
        """The task as a ``datasets.Dataset`` with columns ``prompt`` and :attr:`columns`.

        Parameters
        ----------
        source : str
            ``"generated"`` (the ``"standard"`` distribution) or ``"generated:<name>"`` (a named entry of
            :attr:`distributions`, e.g. ``"generated:testbed"``); tasks with :meth:`read` also take other
            sources (Countdown: a Hub name or a local file).
        n : int, optional
            Number of rows (the first ``n`` of the split); default 10,000 (train) or 1,024 (test) generated
            instances.
        seed : int
            Generator seed; the test split uses ``seed + 1`` (the splits are hash-disjoint anyway).
        split : str
            One of :attr:`splits` (``"train"`` or ``"test"``; Countdown's files also ``"all"``).
        prompt_format : {"chat", "plain"}
            ``prompt`` as :meth:`build_prompt` messages or a :meth:`build_plain_prompt` string.
        prefill, eviction_rate_tag
            Passed to the prompt builders.
        **ranges
            Generator keywords overriding the distribution's (:meth:`generate`).
        """
        if split not in self.splits:
            raise ValueError(f"split must be {_choices(self.splits)}, got {split!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
        if self.is_generated(source):
            if split not in ("train", "test"):
                raise ValueError(f"generated data has no {split!r} split: use 'train' or 'test'")
            name = source.partition(":")[2] or "standard"
            kwargs = self.generator_options(name, split, {**self.distribution(source), **ranges})
            n = n if n is not None else (GENERATED_TRAIN_ROWS if split == "train" else GENERATED_TEST_ROWS)
            rows = self.generate(n, seed + (0 if split == "train" else 1), split=split, **kwargs)
        else:
            rows = self.read(source, n, split)
        return self.dataset(
            rows, prompt_format=prompt_format, prefill=prefill, eviction_rate_tag=eviction_rate_tag
        )

    def dataset(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        prompt_format: str = "chat",
        prefill: bool = True,
        eviction_rate_tag: str | None = None,
    ):
        """``rows`` (instances) as a ``datasets.Dataset``: ``prompt`` then :attr:`columns`."""
        import datasets

        rows = [self.instance(row) for row in rows]
        if prompt_format == "plain":
            prompts = [self.build_plain_prompt(row, eviction_rate_tag) for row in rows]
        else:
            prompts = [
                self.build_prompt(row, eviction_rate_tag=eviction_rate_tag, prefill=prefill) for row in rows
            ]
        return datasets.Dataset.from_dict(
            {"prompt": prompts, **{c: [row[c] for row in rows] for c in self.columns}}
        )

    # ------------------------------------------------------------------ prompts
    def build_prompt(
        self,
        row: Mapping[str, Any],
        *,
        eviction_rate_tag: str | None = None,
        prefill: bool = False,
        system_prompt: str | None = None,
    ) -> list[dict]:
        """The chat prompt of instance ``row``: :meth:`prompt_content` as the user message.

        Parameters
        ----------
        row : mapping
            The instance columns.
        eviction_rate_tag : str, optional
            E.g. ``"<eviction_rate>50%</eviction_rate>"``, appended to the user message.
        prefill : bool
            Append an assistant message :data:`PREFILL` (TRL then continues the final message instead of
            adding a generation prompt). Use for Qwen-Instruct; not for R1-Distill templates.
        system_prompt : str, optional
            A system message (TinyZero used one; none by default).
        """
        return chat_messages(self.prompt_content(row), eviction_rate_tag, prefill, system_prompt)

    def build_plain_prompt(self, row: Mapping[str, Any], eviction_rate_tag: str | None = None) -> str:
        """Compact prompt for tokenizers without a chat template: :meth:`plain_line`, the tag if given, then
        ``"\\n<think>"``. A solution trace continues it (one SFT example)."""
        line = self.plain_line(row)
        if eviction_rate_tag:
            line += " " + eviction_rate_tag
        return line + "\n<think>"

    def format_prompt(
        self,
        row: Mapping[str, Any],
        tokenizer: Any = None,
        *,
        eviction_rate_tag: str | None = None,
        prefill: bool = True,
    ) -> str:
        """The prompt string fed to the model.

        With a tokenizer that has a chat template: the template applied to :meth:`build_prompt` with
        ``add_generation_prompt=True``, followed by :data:`PREFILL` when ``prefill``. Otherwise
        :meth:`build_plain_prompt` (which always ends in ``<think>``).
        """
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                self.build_prompt(row, eviction_rate_tag=eviction_rate_tag),
                tokenize=False,
                add_generation_prompt=True,
            )
            return text + (PREFILL if prefill else "")
        return self.build_plain_prompt(row, eviction_rate_tag=eviction_rate_tag)

    # ------------------------------------------------------------------ parser
    def extract_answer(self, text: str) -> str | None:
        """Content of the last ``<answer>...</answer>``, stripped; ``None`` if absent or over
        :attr:`max_answer_chars` characters (:func:`last_answer_tag`)."""
        return last_answer_tag(text, self.max_answer_chars)
