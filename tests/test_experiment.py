"""The experiment runner: each testbed spec yields the command lines the Makefile pipelines ran, built steps are
skipped, a failing step stops the run with its code, and a bad spec is refused naming the field."""

import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ngc_trl.evaluation import experiment
from ngc_trl.evaluation.experiment import SpecError, Step, execute, load_spec, main, plan

REPO = Path(__file__).resolve().parents[1]
HEURISTICS = "full,keydiff,snapkv,knorm,h2o,tova,streaming_llm,random"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with nothing built, whose recipes/ is the repository's."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def commands(lines):
    """The Makefile's command lines (``$(PYTHON)`` written ``python``) as argv lists run by this interpreter."""
    return [[sys.executable if a == "python" else a for a in shlex.split(line)] for line in lines]


def countdown_makefile():
    """``make testbed_result`` with its variables expanded (TB_N=256, TB_RATES=0.5,0.75,0.875, TB_C=4 8 16,
    TB_WARM=2,4,8,16, TB_WARM_MIN=10), in the Makefile's order."""
    ev = (
        "python -m ngc_trl.eval --task countdown --data_source generated:testbed --num_problems 256 "
        "--rates 0.5,0.75,0.875 --max_new_tokens 576 --batch_size 64 --prompt_format plain"
    )
    lines = ["python -m ngc_trl.testbed --output_dir outputs/tiny-base"]
    for r in ["full_cache", "ngc", "kv_dropout", "token_only"]:
        lines.append(
            f"python -m ngc_trl.train --config recipes/tiny/countdown_{r}.yaml --output_dir outputs/tiny-{r} "
            "--eval_after_train false"
        )
    lines.append(
        "python -m ngc_trl.train --config recipes/tiny/countdown_ngc_score_head.yaml "
        "--output_dir outputs/tiny-ngc-score_head --eval_after_train false"
    )
    lines.append(
        "python -m ngc_trl.testbed --init_from outputs/tiny-base --beacon_ratios 2,4,8,16 --max_minutes 10 "
        "--output_dir outputs/tiny-base-beacons"
    )
    lines.append(
        "python -m ngc_trl.warm_start --model outputs/tiny-base --output_dir outputs/tiny-base-score_head"
    )
    for c in [4, 8, 16]:
        lines.append(
            f"python -m ngc_trl.train --config recipes/tiny/breadcrumbs_countdown.yaml --compression_ratio {c} "
            f"--output_dir outputs/tiny-breadcrumbs-c{c} --eval_after_train false"
        )
    lines.append(
        f"{ev} --model outputs/tiny-full_cache --policies {HEURISTICS} --output_dir outputs/testbed/full_cache"
    )
    lines.append(f"{ev} --model outputs/tiny-ngc --policies full,ngc --output_dir outputs/testbed/ngc")
    # the SFT base has no ngc_settings.json: its evaluations name the tiny recipes' schedule
    tiny = "--eviction_interval 64 --block_size 8 --score_window 5 "
    for model, policy, name, extra in [
        ("tiny-base", "ngc", "ngc_untrained", tiny),
        ("tiny-full_cache", "ngc", "ngc_on_full_cache_grpo", ""),
        ("tiny-base", "oracle", "oracle", tiny),
    ]:
        lines.append(
            f"{ev} --model outputs/{model} --policies full,{policy} {extra}--output_dir outputs/testbed/{name}"
        )
    for r in ["kv_dropout", "token_only"]:
        lines.append(f"{ev} --model outputs/tiny-{r} --policies full,ngc --output_dir outputs/testbed/{r}")
    for model, name in [
        ("tiny-base-score_head", "score_head_warm_start"),
        ("tiny-ngc-score_head", "ngc_score_head"),
    ]:
        lines.append(
            f"{ev} --model outputs/{model} --policies full,score_head --output_dir outputs/testbed/{name}"
        )
    for c in [4, 8, 16]:
        lines.append(
            f"{ev} --model outputs/tiny-breadcrumbs-c{c} --policies full,breadcrumbs --compression_ratios {c} "
            f"--output_dir outputs/testbed/breadcrumbs_c{c}"
        )
    lines.append(
        f"{ev} --model outputs/tiny-base-beacons --policies full,breadcrumbs --compression_ratios 2,4,8,16 "
        "--output_dir outputs/testbed/breadcrumbs_warm_start"
    )
    runs = " ".join(f"outputs/testbed/breadcrumbs_c{c}=breadcrumbs" for c in [4, 8, 16])
    lines.append(
        "python -m ngc_trl.evaluation.metrics --runs outputs/testbed/full_cache outputs/testbed/ngc=ngc "
        "outputs/testbed/ngc_untrained=ngc_untrained outputs/testbed/ngc_on_full_cache_grpo=ngc_on_full_cache_grpo "
        "outputs/testbed/oracle=oracle "
        "outputs/testbed/token_only=token_only outputs/testbed/kv_dropout=kv_dropout "
        "outputs/testbed/score_head_warm_start=score_head_warm_start outputs/testbed/ngc_score_head=ngc_score_head "
        f"{runs} "
        "outputs/testbed/breadcrumbs_warm_start=breadcrumbs_warm_start "
        "--output_dir outputs/testbed/all --title 'tiny Countdown testbed'"
    )
    return commands(lines)


def stargraph_makefile():
    """``make stargraph_result`` expanded (TB_N=256, SG_C=2 4 8, SG_MIN=10, SG_RATES=0.25,0.5,0.75)."""
    ev = (
        "python -m ngc_trl.eval --task stargraph --data_source generated:testbed --num_problems 256 "
        "--rates 0.25,0.5,0.75 --max_new_tokens 128 --batch_size 64 --prompt_format plain --eviction_interval 32 "
        "--block_size 4"
    )
    lines = [
        "python -m ngc_trl.testbed --task stargraph --tokenizer number_sep --output_dir outputs/tiny-base-stargraph "
        "--max_minutes 10 --max_new_tokens 128"
    ]
    for c in [2, 4, 8]:
        lines.append(
            f"python -m ngc_trl.train --config recipes/tiny/breadcrumbs_stargraph.yaml --compression_ratio {c} "
            f"--output_dir outputs/tiny-breadcrumbs-stargraph-c{c} --eval_after_train false"
        )
    lines.append(
        f"{ev} --model outputs/tiny-breadcrumbs-stargraph-c4/teacher --policies {HEURISTICS} "
        "--output_dir outputs/testbed_stargraph/teacher"
    )
    for c in [2, 4, 8]:
        lines.append(
            f"{ev} --model outputs/tiny-breadcrumbs-stargraph-c{c} --policies full,breadcrumbs --compression_ratios {c} "
            f"--output_dir outputs/testbed_stargraph/breadcrumbs_c{c}"
        )
    runs = " ".join(f"outputs/testbed_stargraph/breadcrumbs_c{c}=breadcrumbs" for c in [2, 4, 8])
    lines.append(
        f"python -m ngc_trl.evaluation.metrics --runs outputs/testbed_stargraph/teacher {runs} "
        "--output_dir outputs/testbed_stargraph/all --title 'tiny StarGraph testbed'"
    )
    return commands(lines)


def linsys_makefile():
    """``make linsys_result`` expanded (TB_N=256, LS_C=4 8 16, LS_WARM=2,4,8,16, LS_RATES=0.25,0.5,0.75,0.875,
    TB_WARM_MIN=10), in the Makefile's order."""
    ev = (
        "python -m ngc_trl.eval --task linsys --data_source generated:testbed --num_problems 256 "
        "--rates 0.25,0.5,0.75,0.875 --max_new_tokens 256 --batch_size 64 --prompt_format plain "
        "--eviction_interval 32 --block_size 4"
    )
    lines = [
        "python -m ngc_trl.testbed --task linsys --output_dir outputs/tiny-base-linsys --max_new_tokens 320",
        "python -m ngc_trl.testbed --task linsys --init_from outputs/tiny-base-linsys --beacon_ratios 2,4,8,16 "
        "--max_minutes 10 --max_new_tokens 320 --output_dir outputs/tiny-base-linsys-beacons",
    ]
    for c in [4, 8, 16]:
        lines.append(
            f"python -m ngc_trl.train --config recipes/tiny/breadcrumbs_linsys.yaml --compression_ratio {c} "
            f"--output_dir outputs/tiny-breadcrumbs-linsys-c{c} --eval_after_train false"
        )
    lines.append("python -m ngc_trl.train --config recipes/tiny/linsys_ngc.yaml --eval_after_train false")
    lines.append(
        f"{ev} --model outputs/tiny-breadcrumbs-linsys-c8/teacher --policies {HEURISTICS} "
        "--output_dir outputs/testbed_linsys/full_cache"
    )
    lines.append(
        f"{ev} --model outputs/tiny-ngc-linsys --policies full,ngc --output_dir outputs/testbed_linsys/ngc"
    )
    for c in [4, 8, 16]:
        lines.append(
            f"{ev} --model outputs/tiny-breadcrumbs-linsys-c{c} --policies full,breadcrumbs --compression_ratios {c} "
            f"--output_dir outputs/testbed_linsys/breadcrumbs_c{c}"
        )
    lines.append(
        f"{ev} --model outputs/tiny-base-linsys-beacons --policies full,breadcrumbs --compression_ratios 2,4,8,16 "
        "--output_dir outputs/testbed_linsys/breadcrumbs_warm_start"
    )
    runs = " ".join(f"outputs/testbed_linsys/breadcrumbs_c{c}=breadcrumbs" for c in [4, 8, 16])
    lines.append(
        "python -m ngc_trl.evaluation.metrics --runs outputs/testbed_linsys/full_cache outputs/testbed_linsys/ngc=ngc "
        f"{runs} outputs/testbed_linsys/breadcrumbs_warm_start=breadcrumbs_warm_start "
        "--output_dir outputs/testbed_linsys/all --title 'tiny LinSys testbed'"
    )
    return commands(lines)


def countdown_runner_order():
    """The Countdown pipeline in the runner's order: bases first, so the beacon and the scoring-head warm
    starts (which only read outputs/tiny-base) move ahead of the RL runs; every other command keeps its place."""
    steps = countdown_makefile()
    warm = [steps.pop(6), steps.pop(6)]
    assert warm[0][2:4] == ["ngc_trl.testbed", "--init_from"] and warm[1][2] == "ngc_trl.warm_start"
    return steps[:1] + warm + steps[1:]


def dry_run(capsys, *args):
    """The command lines ``--dry_run`` prints (skipped ones are comments), as argv lists."""
    assert main(["--dry_run", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


PIPELINES = [
    ("countdown", "testbed_result", countdown_runner_order),
    ("stargraph", "stargraph_result", stargraph_makefile),
    ("linsys", "linsys_result", linsys_makefile),
]


@pytest.mark.parametrize("task, target, expected", PIPELINES)
def test_specs_run_the_makefile_pipelines(workdir, capsys, task, target, expected):
    spec = f"recipes/testbed/{task}.yaml"
    assert dry_run(capsys, "--spec", spec) == expected()
    assert [s.argv for s in plan(load_spec(spec))] == expected()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("task, target, expected", PIPELINES)
def test_make_targets_call_the_runner(workdir, capsys, task, target, expected):
    make = ["make", "-n", "-s", target, "SET=n=256 rates=0.1"]
    line = subprocess.run(make, cwd=REPO, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(line)
    assert argv[:5] == [
        "python",
        "-m",
        "ngc_trl.evaluation.experiment",
        "--spec",
        f"recipes/testbed/{task}.yaml",
    ]
    steps = dry_run(capsys, *argv[3:])
    assert [s for s in steps if "ngc_trl.eval" not in s] == [s for s in expected() if "ngc_trl.eval" not in s]
    assert {s[s.index("--rates") + 1] for s in steps if "ngc_trl.eval" in s} == {"0.1"}


def test_set_overrides_vars(workdir, capsys):
    steps = dry_run(capsys, "--spec", "recipes/testbed/countdown.yaml", "--set", "c=[4,8]", "--set", "n=64")
    trained = [s[s.index("--output_dir") + 1] for s in steps if "ngc_trl.train" in s]
    assert [d for d in trained if "breadcrumbs" in d] == [
        "outputs/tiny-breadcrumbs-c4",
        "outputs/tiny-breadcrumbs-c8",
    ]
    evals = [s for s in steps if "ngc_trl.eval" in s]
    assert len(evals) == 12 and all(s[s.index("--num_problems") + 1] == "64" for s in evals)
    steps = dry_run(capsys, "--spec", "recipes/testbed/stargraph.yaml", "--set", "c=4")  # a scalar for a list
    assert sum("ngc_trl.train" in s for s in steps) == 1


def touch(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("{}")


def test_built_steps_are_skipped(workdir, capsys):
    touch("outputs/tiny-base/config.json")
    touch("outputs/tiny-ngc/ngc_settings.json")
    touch("outputs/tiny-breadcrumbs-c8/ngc_settings.json")
    touch("outputs/tiny-base-beacons/config.json")  # not the beacon base's marker: it is still built
    touch("outputs/tiny-kv_dropout/config.json")  # a base's marker, not a trained model's
    (workdir / "outputs/tiny-token_only/ngc_settings.json").mkdir(parents=True)  # not a file, as `test -f`
    assert main(["--dry_run", "--spec", "recipes/testbed/countdown.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = [shlex.split(line.split(": ", 1)[1]) for line in lines if line.startswith("# skip")]
    everything = countdown_runner_order()
    built = {0, 4, 9}  # the base, the NGC run, the c = 8 student
    assert skipped == [everything[i] for i in sorted(built)]
    assert [shlex.split(line) for line in lines if not line.startswith("#")] == [
        s for i, s in enumerate(everything) if i not in built
    ]
    calls = []
    assert (
        execute(plan(load_spec("recipes/testbed/countdown.yaml")), call=lambda a: calls.append(a) or 0) == 0
    )
    assert calls == [s for i, s in enumerate(everything) if i not in built]


def test_markers_are_checked_when_the_step_comes(workdir):
    steps = [
        Step(["build", "a"], "out/a/config.json"),
        Step(["build", "b"], "out/a/config.json"),
        Step(["eval"]),
    ]
    calls = []

    def call(argv):
        calls.append(argv)
        if argv == ["build", "a"]:
            touch("out/a/config.json")
        return 0

    assert execute(steps, call=call) == 0
    assert calls == [["build", "a"], ["eval"]]


def test_a_failing_step_stops_the_run_with_its_code(workdir, capsys):
    calls = []
    steps = [Step(["one"]), Step(["two"]), Step(["three"])]
    assert execute(steps, call=lambda a: calls.append(a) or (5 if a == ["two"] else 0)) == 5
    assert calls == [["one"], ["two"]]
    assert "exit code 5: two" in capsys.readouterr().err
    py = [sys.executable, "-c"]
    steps = [
        Step(py + ["open('ran', 'w')"]),
        Step(py + ["raise SystemExit(3)"]),
        Step(py + ["open('late', 'w')"]),
    ]
    assert execute(steps) == 3
    assert (workdir / "ran").exists() and not (workdir / "late").exists()


def test_main_runs_each_step_with_this_interpreter(workdir, monkeypatch):
    fake = workdir / "python"
    fake.write_text('#!/bin/sh\necho "$@" >> log\ncase "$2" in ngc_trl.eval) exit 7;; esac\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(fake))
    assert main(["--spec", "recipes/testbed/stargraph.yaml"]) == 7
    logged = [line.split() for line in (workdir / "log").read_text().splitlines()]
    assert logged == [s[1:] for s in stargraph_makefile()[:5]]  # the base, 3 students, the failing evaluation


def write(tmp, spec) -> str:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def countdown():
    return yaml.safe_load((REPO / "recipes/testbed/countdown.yaml").read_text())


def unknown_top(s):
    s["evals"] = s.pop("evaluations")


def unknown_nested(s):
    s["train"][1]["cofig"] = s["train"][1].pop("config")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (unknown_top, r"spec: unknown key\(s\) evals"),
        (unknown_nested, r"spec.train\[1\]: unknown key\(s\) cofig"),
        (lambda s: s.pop("eval_dir"), r"spec.eval_dir: required key missing"),
        (lambda s: s["report"].pop("output_dir"), r"spec.report.output_dir: required key missing"),
        (
            lambda s: s["evaluations"][1].update(policies="full,ngc"),
            r"spec.evaluations\[1\].policies: expected list",
        ),
        (
            lambda s: s["eval_args"].update(num_problems=[1, 2]),
            r"spec.eval_args.num_problems: expected str \| int",
        ),
        (lambda s: s["bases"][1].update(done=None), r"spec.bases\[1\].done: expected str"),
        (lambda s: s["report"].update(runs="ngc"), r"spec.report.runs: expected list"),
        (lambda s: s.update(train={"config": "x"}), r"spec.train: expected list"),
        (lambda s: s["bases"][0]["args"].pop("output_dir"), r"spec.bases\[0\].args.output_dir: required"),
        (lambda s: s["bases"][1].update(command="sft"), r"spec.bases\[1\].command='sft': must be one of"),
        (
            lambda s: s["eval_args"].update(num_problems="{m}"),
            r"spec.eval_args.num_problems: unknown variable \{m\}",
        ),
        (lambda s: s["evaluations"][1].update(model="x{c}"), r"spec.evaluations\[1\].model: .*a list"),
        (lambda s: s["train"][4].update(foreach="n"), r"spec.train\[4\].foreach: 'n' is not a list"),
        (
            lambda s: s["report"]["runs"][1].update(eval="ngcc"),
            r"spec.report.runs\[1\].eval: no evaluation named",
        ),
        (lambda s: s["evaluations"][2].update(name="ngc"), r"name 'ngc' is used twice"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(workdir, mutate, message):
    spec = countdown()
    mutate(spec)
    with pytest.raises(SpecError, match=message):
        load_spec(write(workdir, spec))


def test_bad_specs_fail_the_command_line(workdir, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "execute", lambda *a, **k: pytest.fail("ran a bad spec"))
    with pytest.raises(SystemExit) as e:
        main(["--spec", "recipes/testbed/countdown.yaml", "--set", "m=3"])
    assert e.value.code == 2 and "--set m: no such variable" in capsys.readouterr().err
    for bad, message in [
        ("c=[4,", "'[4,' is not a YAML value"),
        ("c", "expected NAME=VALUE"),
        ("c={a: 1}", "--set c"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["--spec", "recipes/testbed/countdown.yaml", "--set", bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    spec = countdown()
    spec["train"] = [{"config": "recipes/tiny/missing.yaml"}]
    with pytest.raises(SystemExit) as e:
        main(["--dry_run", "--spec", write(workdir, spec)])
    assert (
        e.value.code == 2
        and "spec.train[0].config: cannot read recipes/tiny/missing.yaml" in capsys.readouterr().err
    )
    (workdir / "spec.yaml").write_text("- a list\n")
    with pytest.raises(SystemExit) as e:
        main(["--spec", str(workdir / "spec.yaml")])
    assert e.value.code == 2 and "spec: expected a mapping, got list" in capsys.readouterr().err
