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

# issue 5/7's testbed table: every tiny model trained, then evaluated on one held-out split and one axis
# (heuristics on the full-cache GRPO model, as in the paper; NGC, the ablations and Breadcrumbs students on
# their own models). Results: outputs/testbed/all/{results.md,pareto.png,summary.json}.
TB_N ?= 256
TB_RATES ?= 0.5,0.75,0.875
TB_C ?= 4 8 16
TB_WARM ?= 2,4,8,16
TB_WARM_MIN ?= 10
TB_EVAL = $(PYTHON) -m ngc_trl.eval --task countdown --data_source generated:testbed --num_problems $(TB_N) \
	--rates $(TB_RATES) --max_new_tokens 576 --batch_size 64 --prompt_format plain
testbed_result:
	test -f outputs/tiny-base/config.json || $(PYTHON) -m ngc_trl.testbed --output_dir outputs/tiny-base
	for r in full_cache ngc kv_dropout token_only; do \
		test -f outputs/tiny-$$r/ngc_settings.json || \
		$(PYTHON) -m ngc_trl.train --config recipes/tiny/countdown_$$r.yaml --output_dir outputs/tiny-$$r \
			--eval_after_train false || exit 1; done
	test -f outputs/tiny-base-beacons/ngc_settings.json || $(PYTHON) -m ngc_trl.testbed --init_from outputs/tiny-base \
		--beacon_ratios $(TB_WARM) --max_minutes $(TB_WARM_MIN) --output_dir outputs/tiny-base-beacons
	for c in $(TB_C); do test -f outputs/tiny-breadcrumbs-c$$c/ngc_settings.json || \
		$(PYTHON) -m ngc_trl.train --config recipes/tiny/breadcrumbs_countdown.yaml --compression_ratio $$c \
			--output_dir outputs/tiny-breadcrumbs-c$$c --eval_after_train false || exit 1; done
	$(TB_EVAL) --model outputs/tiny-full_cache --policies full,keydiff,snapkv,knorm,h2o,tova,streaming_llm,random \
		--output_dir outputs/testbed/full_cache
	for r in ngc kv_dropout token_only; do $(TB_EVAL) --model outputs/tiny-$$r --policies full,ngc \
		--output_dir outputs/testbed/$$r || exit 1; done
	for c in $(TB_C); do $(TB_EVAL) --model outputs/tiny-breadcrumbs-c$$c --policies full,breadcrumbs \
		--compression_ratios $$c --output_dir outputs/testbed/breadcrumbs_c$$c || exit 1; done
	$(TB_EVAL) --model outputs/tiny-base-beacons --policies full,breadcrumbs --compression_ratios $(TB_WARM) \
		--output_dir outputs/testbed/breadcrumbs_warm_start
	$(PYTHON) -m ngc_trl.evaluation.metrics --runs outputs/testbed/full_cache outputs/testbed/ngc=ngc \
		outputs/testbed/token_only=token_only outputs/testbed/kv_dropout=kv_dropout \
		$(foreach c,$(TB_C),outputs/testbed/breadcrumbs_c$(c)=breadcrumbs) \
		outputs/testbed/breadcrumbs_warm_start=breadcrumbs_warm_start \
		--output_dir outputs/testbed/all --title "tiny Countdown testbed"

# a third task: Breadcrumbs students on StarGraph (arm-by-arm search traces) next to the heuristics on a
# full-cache GRPO teacher (the c = 4 run's), δ = 32 and b = 4 for the short rollouts.
# Results: outputs/testbed_stargraph/all/{results.md,pareto.png,summary.json}.
SG_C ?= 2 4 8
SG_MIN ?= 10
SG_RATES ?= 0.25,0.5,0.75
SG_EVAL = $(PYTHON) -m ngc_trl.eval --task stargraph --data_source generated:testbed --num_problems $(TB_N) \
	--rates $(SG_RATES) --max_new_tokens 128 --batch_size 64 --prompt_format plain --eviction_interval 32 --block_size 4
stargraph_result:
	test -f outputs/tiny-base-stargraph/config.json || $(PYTHON) -m ngc_trl.testbed --task stargraph --tokenizer number_sep \
		--output_dir outputs/tiny-base-stargraph --max_minutes $(SG_MIN) --max_new_tokens 128
	for c in $(SG_C); do test -f outputs/tiny-breadcrumbs-stargraph-c$$c/ngc_settings.json || \
		$(PYTHON) -m ngc_trl.train --config recipes/tiny/breadcrumbs_stargraph.yaml --compression_ratio $$c \
			--output_dir outputs/tiny-breadcrumbs-stargraph-c$$c --eval_after_train false || exit 1; done
	$(SG_EVAL) --model outputs/tiny-breadcrumbs-stargraph-c4/teacher \
		--policies full,keydiff,snapkv,knorm,h2o,tova,streaming_llm,random --output_dir outputs/testbed_stargraph/teacher
	for c in $(SG_C); do $(SG_EVAL) --model outputs/tiny-breadcrumbs-stargraph-c$$c --policies full,breadcrumbs \
		--compression_ratios $$c --output_dir outputs/testbed_stargraph/breadcrumbs_c$$c || exit 1; done
	$(PYTHON) -m ngc_trl.evaluation.metrics --runs outputs/testbed_stargraph/teacher \
		$(foreach c,$(SG_C),outputs/testbed_stargraph/breadcrumbs_c$(c)=breadcrumbs) \
		--output_dir outputs/testbed_stargraph/all --title "tiny StarGraph testbed"

# issue 7's second task: LinSys (2x2 systems, elimination traces with the arithmetic written out). The same pipeline as
# testbed_result at δ = 32, b = 4 (rollouts are ~190 tokens): base, beacon warm start, Breadcrumbs students from it, NGC,
# and the heuristics on the full-cache GRPO teacher of the c = 8 run.
# Results: outputs/testbed_linsys/all/{results.md,pareto.png,summary.json}.
LS_C ?= 4 8 16
LS_WARM ?= 2,4,8,16
LS_RATES ?= 0.25,0.5,0.75,0.875
LS_EVAL = $(PYTHON) -m ngc_trl.eval --task linsys --data_source generated:testbed --num_problems $(TB_N) \
	--rates $(LS_RATES) --max_new_tokens 256 --batch_size 64 --prompt_format plain --eviction_interval 32 --block_size 4
linsys_result:
	test -f outputs/tiny-base-linsys/config.json || $(PYTHON) -m ngc_trl.testbed --task linsys \
		--output_dir outputs/tiny-base-linsys --max_new_tokens 320
	test -f outputs/tiny-base-linsys-beacons/ngc_settings.json || $(PYTHON) -m ngc_trl.testbed --task linsys \
		--init_from outputs/tiny-base-linsys --beacon_ratios $(LS_WARM) --max_minutes $(TB_WARM_MIN) \
		--max_new_tokens 320 --output_dir outputs/tiny-base-linsys-beacons
	for c in $(LS_C); do test -f outputs/tiny-breadcrumbs-linsys-c$$c/ngc_settings.json || \
		$(PYTHON) -m ngc_trl.train --config recipes/tiny/breadcrumbs_linsys.yaml --compression_ratio $$c \
			--output_dir outputs/tiny-breadcrumbs-linsys-c$$c --eval_after_train false || exit 1; done
	test -f outputs/tiny-ngc-linsys/ngc_settings.json || $(PYTHON) -m ngc_trl.train --config recipes/tiny/linsys_ngc.yaml \
		--eval_after_train false
	$(LS_EVAL) --model outputs/tiny-breadcrumbs-linsys-c8/teacher \
		--policies full,keydiff,snapkv,knorm,h2o,tova,streaming_llm,random --output_dir outputs/testbed_linsys/full_cache
	$(LS_EVAL) --model outputs/tiny-ngc-linsys --policies full,ngc --output_dir outputs/testbed_linsys/ngc
	for c in $(LS_C); do $(LS_EVAL) --model outputs/tiny-breadcrumbs-linsys-c$$c --policies full,breadcrumbs \
		--compression_ratios $$c --output_dir outputs/testbed_linsys/breadcrumbs_c$$c || exit 1; done
	$(LS_EVAL) --model outputs/tiny-base-linsys-beacons --policies full,breadcrumbs --compression_ratios $(LS_WARM) \
		--output_dir outputs/testbed_linsys/breadcrumbs_warm_start
	$(PYTHON) -m ngc_trl.evaluation.metrics --runs outputs/testbed_linsys/full_cache outputs/testbed_linsys/ngc=ngc \
		$(foreach c,$(LS_C),outputs/testbed_linsys/breadcrumbs_c$(c)=breadcrumbs) \
		outputs/testbed_linsys/breadcrumbs_warm_start=breadcrumbs_warm_start \
		--output_dir outputs/testbed_linsys/all --title "tiny LinSys testbed"

# the fixed held-out splits of the results, data/testbed/<task>/*.jsonl + data/SHA256SUMS (data/README.md)
.PHONY: data
data: ; $(PYTHON) -m ngc_trl.splits --out data
