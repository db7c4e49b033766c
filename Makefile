# ngc-trl: every target runs the local checkout.
PYTHON ?= python
MODEL ?= outputs/tiny-ngc
TASK ?= countdown
POLICIES ?= full,ngc,keydiff,snapkv,tova,h2o,streaming_llm,knorm,random
RATES ?= 0.25,0.5,0.75
N ?= 256
DATA ?=
OUT ?= outputs/eval

.PHONY: install test slow_test quality style bench eval testbed tiny

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

eval:
	$(PYTHON) -m ngc_trl.eval --model $(MODEL) --task $(TASK) --policies $(POLICIES) --rates $(RATES) \
		--num_problems $(N) $(if $(DATA),--data_source $(DATA)) --output_dir $(OUT)

testbed:
	$(PYTHON) -m ngc_trl.testbed

# the offline main job: tiny base (built once) -> NGC training -> short evaluation
tiny:
	test -f outputs/tiny-base/config.json || $(PYTHON) -m ngc_trl.testbed --output_dir outputs/tiny-base
	$(PYTHON) -m ngc_trl.train --config recipes/tiny/countdown_ngc.yaml
