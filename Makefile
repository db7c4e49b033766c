# ngc-trl: every target runs the local checkout.
PYTHON ?= python
MODEL ?= outputs/tiny-ngc
TASK ?= countdown
POLICIES ?= full,ngc,keydiff,snapkv,tova,h2o,streaming_llm,knorm,random
RATES ?= 0.25,0.5,0.75
C ?= 2,4,8,16,32
N ?= 256
DATA ?=
OUT ?= outputs/eval
EXTRA ?=

.PHONY: install test slow_test quality style bench gpu_check eval testbed tiny testbed_result stargraph_result linsys_result

install:
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest tests -m "not slow" -q

slow_test:
	$(PYTHON) -m pytest tests -m slow -q

quality:
	ruff check ngc_trl tests bench
	ruff format --check ngc_trl tests bench
	$(PYTHON) -m mypy ngc_trl/engine

style:
	ruff check --fix ngc_trl tests bench
	ruff format ngc_trl tests bench

bench:
	$(PYTHON) bench/decode.py --out outputs/bench/decode.json
	$(PYTHON) bench/train_step.py --out outputs/bench/train_step.json

# one H100/H200, about 8 minutes: replay parity, decode, train step and fixed-KV-budget checks in one JSON
# (bench/README.md); `python bench/gpu_check.py --dry_run` runs the same code on CPU
gpu_check:
	$(PYTHON) bench/gpu_check.py --out outputs/bench/gpu_check.json

eval:
	$(PYTHON) -m ngc_trl.eval --model $(MODEL) --task $(TASK) --policies $(POLICIES) --rates $(RATES) \
		--compression_ratios $(C) --num_problems $(N) $(if $(DATA),--data_source $(DATA)) --output_dir $(OUT) $(EXTRA)

testbed:
	$(PYTHON) -m ngc_trl.testbed

# the offline main job: tiny base (built once) -> NGC training -> short evaluation
tiny:
	test -f outputs/tiny-base/config.json || $(PYTHON) -m ngc_trl.testbed --output_dir outputs/tiny-base
	$(PYTHON) -m ngc_trl.train --config recipes/tiny/countdown_ngc.yaml

# The testbed tables: one experiment spec per task (recipes/testbed/*.yaml: the bases, training runs, evaluations and
# report), run by ngc_trl.evaluation.experiment; models and bases already built are kept. SET overrides the spec's
# vars, e.g. `make testbed_result SET="n=64 c=[4,8]"`; `python -m ngc_trl.evaluation.experiment --spec ... --dry_run`
# prints the command lines.
SET ?=
experiment = $(strip $(PYTHON) -m ngc_trl.evaluation.experiment --spec $(1) $(foreach s,$(SET),--set '$(s)'))

# the Countdown testbed table: every tiny model trained, then evaluated on one held-out split and one axis
# (heuristics on the full-cache GRPO model, as in the paper; NGC, the ablations and Breadcrumbs students on
# their own models). Results: outputs/testbed/all/{results.md,pareto.png,summary.json}.
testbed_result:
	$(call experiment,recipes/testbed/countdown.yaml)

# a third task: Breadcrumbs students on StarGraph (arm-by-arm search traces) next to the heuristics on a
# full-cache GRPO teacher (the c = 4 run's), δ = 32 and b = 4 for the short rollouts.
# Results: outputs/testbed_stargraph/all/{results.md,pareto.png,summary.json}.
stargraph_result:
	$(call experiment,recipes/testbed/stargraph.yaml)

# a second task: LinSys (2x2 systems, elimination traces with the arithmetic written out). The same pipeline as
# testbed_result at δ = 32, b = 4 (rollouts are ~190 tokens): base, beacon warm start, Breadcrumbs students from it, NGC,
# and the heuristics on the full-cache GRPO teacher of the c = 8 run.
# Results: outputs/testbed_linsys/all/{results.md,pareto.png,summary.json}.
linsys_result:
	$(call experiment,recipes/testbed/linsys.yaml)

# the fixed held-out splits of the results, data/testbed/<task>/*.jsonl + data/SHA256SUMS (data/README.md)
.PHONY: data
data: ; $(PYTHON) -m ngc_trl.splits --out data
