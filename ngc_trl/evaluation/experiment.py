"""``python -m ngc_trl.evaluation.experiment --spec recipes/testbed/countdown.yaml [--dry_run] [--set n=64]``

An experiment is data: a YAML spec lists the tiny bases to build (``python -m ngc_trl.testbed``, or the
scoring-head warm start ``python -m ngc_trl.warm_start`` with ``command: warm_start``), the training
runs (``python -m ngc_trl.train``), the evaluations (``python -m ngc_trl.eval``) and the report
(``python -m ngc_trl.evaluation.metrics``). The runner turns it into command lines and runs them in that order,
each as a subprocess of the same interpreter, from the working directory (paths in a spec are relative to it:
run from the repository root). A base or training run whose marker file already exists (``config.json`` for a
base, ``ngc_settings.json`` for a trained model, ``done`` to change it) is skipped; evaluations always run
(they resume from their own logs). The first failing step stops the run with its exit code.

Spec keys (``vars``, ``bases``, ``train``, ``train_args`` and ``eval_args`` are optional)::

    vars:        {name: scalar or list}        # strings below may say {name}; --set name=VALUE overrides
    bases:       [{args: {...testbed arguments, output_dir required...}, done: config.json, foreach: NAME,
                   command: testbed | warm_start}]
    train:       [{config: RECIPE, args: {...}, done: ngc_settings.json, foreach: NAME}]
    train_args:  {...}                         # appended to every training run
    eval_args:   {...}                         # shared by every evaluation, before its own arguments
    eval_dir:    DIR                           # evaluation NAME writes to DIR/NAME
    evaluations: [{name: NAME, model: DIR, policies: [..], args: {...}, foreach: NAME}]
    report:      {output_dir: DIR, title: TEXT, runs: [{eval: NAME, label: LABEL, foreach: NAME}]}

Arguments are mappings rendered in order as ``--key value`` (booleans as ``true``/``false``). A training run
without ``output_dir`` in its ``args`` uses (and is checked at) its recipe's ``output_dir``. An entry with
``foreach: NAME`` is repeated once per element of the list variable ``NAME``, bound to ``{NAME}``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import partial
from pathlib import Path

import yaml

Scalar = str | int | float | bool


class SpecError(ValueError):
    """A spec that cannot be run; the message names the offending field."""


BASE_COMMANDS = {"testbed": "ngc_trl.testbed", "warm_start": "ngc_trl.warm_start"}


@dataclass
class Base:
    args: dict[str, Scalar]
    done: str = "config.json"
    foreach: str | None = None
    command: str = "testbed"


@dataclass
class TrainRun:
    config: str
    args: dict[str, Scalar] = field(default_factory=dict)
    done: str = "ngc_settings.json"
    foreach: str | None = None


@dataclass
class Evaluation:
    name: str
    model: str
    policies: list[str]
    args: dict[str, Scalar] = field(default_factory=dict)
    foreach: str | None = None


@dataclass
class ReportRun:
    eval: str
    label: str | None = None
    foreach: str | None = None


@dataclass
class Report:
    output_dir: str
    runs: list[ReportRun]
    title: str = ""


@dataclass
class Spec:
    eval_dir: str
    evaluations: list[Evaluation]
    report: Report
    vars: dict[str, Scalar | list[Scalar]] = field(default_factory=dict)
    bases: list[Base] = field(default_factory=list)
    train: list[TrainRun] = field(default_factory=list)
    train_args: dict[str, Scalar] = field(default_factory=dict)
    eval_args: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class Step:
    """One command line; skipped when the file ``done`` (if any) exists when its turn comes."""

    argv: list[str]
    done: str | None = None


def _type_name(tp) -> str:
    """How a schema type reads in an error message: ``str``, ``list[str]``, ``str | None``."""
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp)


def _check(value, tp, where: str):
    """``value`` checked against the schema type ``tp`` (dataclass, union, list, dict or plain type)."""
    if is_dataclass(tp):
        return _build(tp, value, where)
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in targs:
            try:
                return _check(value, option, where)
            except SpecError:
                pass
    elif origin is list and isinstance(value, list):
        return [_check(v, targs[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {_check(k, str, where): _check(v, targs[1], f"{where}.{k}") for k, v in value.items()}
    elif origin is None and isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    raise SpecError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data, where: str):
    """An instance of the dataclass ``cls`` from a mapping, refusing unknown keys, missing keys, wrong types."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = [str(k) for k in data if k not in known]
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)} (expected: {', '.join(known)})")
    hints, kwargs = typing.get_type_hints(cls), {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _check(data[name], hints[name], f"{where}.{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise SpecError(f"{where}.{name}: required key missing")
    return cls(**kwargs)


def _fill(value, where: str, names: dict, lists: dict):
    """``value`` with every ``{name}`` in its strings (recursively) replaced by the scalar variable ``name``."""
    if isinstance(value, str):
        try:
            return value.format_map(names)
        except KeyError as e:
            name = e.args[0]
            hint = " (a list: expand the entry with foreach)" if name in lists else ""
            raise SpecError(f"{where}: unknown variable {{{name}}}{hint}") from None
        except (ValueError, IndexError) as e:
            raise SpecError(f"{where}: bad placeholder in {value!r} ({e})") from None
    if isinstance(value, list):
        return [_fill(v, f"{where}[{i}]", names, lists) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _fill(v, f"{where}.{k}", names, lists) for k, v in value.items()}
    if is_dataclass(value):
        filled = {
            f.name: _fill(getattr(value, f.name), f"{where}.{f.name}", names, lists) for f in fields(value)
        }
        return replace(value, **filled)
    return value


def _expand(entries: list, where: str, names: dict, lists: dict) -> list:
    """Each entry with its variables filled in, repeated once per element of its ``foreach`` list."""
    out = []
    for i, entry in enumerate(entries):
        if entry.foreach is not None and entry.foreach not in lists:
            raise SpecError(f"{where}[{i}].foreach: {entry.foreach!r} is not a list variable in vars")
        values = [None] if entry.foreach is None else lists[entry.foreach]
        for v in values:
            bound = names if entry.foreach is None else {**names, entry.foreach: v}
            out.append(replace(_fill(entry, f"{where}[{i}]", bound, lists), foreach=None))
    return out


def load_spec(path: str | Path, overrides: dict | None = None) -> Spec:
    """The spec at ``path`` validated, with ``overrides`` replacing its vars and every entry expanded."""
    with open(path) as f:
        spec = _build(Spec, yaml.safe_load(f), "spec")
    for name, value in (overrides or {}).items():
        if name not in spec.vars:
            raise SpecError(f"--set {name}: no such variable in vars (have: {', '.join(spec.vars)})")
        if isinstance(spec.vars[name], list) and not isinstance(value, list):
            value = [value]
        spec.vars[name] = _check(value, Scalar | list[Scalar], f"--set {name}")
    lists = {k: v for k, v in spec.vars.items() if isinstance(v, list)}
    names = {k: v for k, v in spec.vars.items() if not isinstance(v, list)}
    fill, expand = partial(_fill, names=names, lists=lists), partial(_expand, names=names, lists=lists)
    spec = replace(
        spec,
        bases=expand(spec.bases, "spec.bases"),
        train=expand(spec.train, "spec.train"),
        train_args=fill(spec.train_args, "spec.train_args"),
        eval_args=fill(spec.eval_args, "spec.eval_args"),
        eval_dir=fill(spec.eval_dir, "spec.eval_dir"),
        evaluations=expand(spec.evaluations, "spec.evaluations"),
        report=Report(
            output_dir=fill(spec.report.output_dir, "spec.report.output_dir"),
            runs=expand(spec.report.runs, "spec.report.runs"),
            title=fill(spec.report.title, "spec.report.title"),
        ),
    )
    evals = [e.name for e in spec.evaluations]
    for name in {n for n in evals if evals.count(n) > 1}:
        raise SpecError(f"spec.evaluations: name {name!r} is used twice")
    for i, run in enumerate(spec.report.runs):
        if run.eval not in evals:
            raise SpecError(f"spec.report.runs[{i}].eval: no evaluation named {run.eval!r}")
    for i, base in enumerate(spec.bases):
        if "output_dir" not in base.args:
            raise SpecError(f"spec.bases[{i}].args.output_dir: required key missing")
        if base.command not in BASE_COMMANDS:
            raise SpecError(
                f"spec.bases[{i}].command={base.command!r}: must be one of {', '.join(BASE_COMMANDS)}"
            )
    return spec


def _argv(*mappings: dict[str, Scalar]) -> list[str]:
    """``--key value`` for each item of each mapping, in order; booleans as ``true``/``false``."""
    return [
        a
        for m in mappings
        for k, v in m.items()
        for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))
    ]


def _recipe_output_dir(config: str, where: str) -> str:
    """The ``output_dir`` a training recipe writes to when the command line does not override it."""
    try:
        with open(config) as f:
            recipe = yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"{where}.config: cannot read {config} ({e.strerror})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("output_dir"), str):
        raise SpecError(f"{where}: {config} has no output_dir; give one in args")
    return recipe["output_dir"]


def plan(spec: Spec) -> list[Step]:
    """The spec's command lines in run order: bases, training runs, evaluations, the report."""
    py = [sys.executable, "-m"]
    steps = [
        Step(py + [BASE_COMMANDS[b.command], *_argv(b.args)], f"{b.args['output_dir']}/{b.done}")
        for b in spec.bases
    ]
    for i, run in enumerate(spec.train):
        out = run.args.get("output_dir") or _recipe_output_dir(run.config, f"spec.train[{i}]")
        argv = py + ["ngc_trl.train", "--config", run.config, *_argv(run.args, spec.train_args)]
        steps.append(Step(argv, f"{out}/{run.done}"))
    for e in spec.evaluations:
        own = {"model": e.model, "policies": ",".join(e.policies)}
        out = {"output_dir": f"{spec.eval_dir}/{e.name}"}
        steps.append(Step(py + ["ngc_trl.eval", *_argv(spec.eval_args, own, e.args, out)]))
    runs = [f"{spec.eval_dir}/{r.eval}" + (f"={r.label}" if r.label else "") for r in spec.report.runs]
    report = ["ngc_trl.evaluation.metrics", "--runs", *runs, "--output_dir", spec.report.output_dir]
    steps.append(Step(py + report + ["--title", spec.report.title]))
    return steps


def execute(
    steps: list[Step], dry_run: bool = False, call: Callable[[list[str]], int] = subprocess.call
) -> int:
    """Runs the steps in order (or, with ``dry_run``, prints them); returns the first non-zero exit code, or 0."""
    for step in steps:
        line = shlex.join(step.argv)
        if step.done and Path(step.done).is_file():
            print(
                f"# skip ({step.done} exists): {line}" if dry_run else f"skip: {step.done} exists", flush=True
            )
            continue
        print(line if dry_run else f"+ {line}", flush=True)
        if not dry_run and (code := call(step.argv)) != 0:
            print(f"experiment: step failed with exit code {code}: {line}", file=sys.stderr, flush=True)
            return code
    return 0


def _override(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` from ``--set``, the value read as YAML (``c=[4,8]`` is a list, ``n=64`` a number)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a YAML value ({e.problem})") from None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: loads and checks the spec, then runs (or prints) its steps; returns the exit code."""
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(
        prog="python -m ngc_trl.evaluation.experiment", description=__doc__, formatter_class=fmt
    )
    ap.add_argument("--spec", required=True, help="the experiment spec, e.g. recipes/testbed/countdown.yaml")
    ap.add_argument("--dry_run", action="store_true", help="print the command lines instead of running them")
    ap.add_argument(
        "--set", type=_override, action="append", default=[], metavar="NAME=VALUE", help="override a var"
    )
    a = ap.parse_args(argv)
    try:
        steps = plan(load_spec(a.spec, dict(a.set)))
    except (SpecError, OSError, yaml.YAMLError) as e:
        ap.error(f"{a.spec}: {e}")
    return execute(steps, dry_run=a.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
