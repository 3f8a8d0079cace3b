# make help  lists the targets. Every target sets itself up (a .venv with the CPU torch wheel).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
EXP     ?= tiny
CORPUS  ?= data/tiny
PYTEST_ARGS ?=

.PHONY: help setup corpus demo demo-input demo-input-main demo-input-dynamic test bench bench-data bench-llm bench-input lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv: the torch wheel first, then this project (editable) with dev tools

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

corpus: setup ## synthesize the tiny eSpeak corpus, write its shards and CMVN stats
	$(PY) -m tools.prepare_corpus --out $(CORPUS)

demo: corpus ## the embedded default: corpus, stand-in LLM, its evaluation (speech input: make demo-input)
	$(PY) train.py stage=llm_text experiment=$(EXP)

demo-input: setup ## speech input only (needs the corpus and stage llm_text): 3 stages + the dynamic-chunk variant, both tables
	$(MAKE) -j2 demo-input-main demo-input-dynamic
	$(PY) train.py stage=input_3_prompt experiment=$(EXP)
	$(PY) infer.py eval_input experiment=$(EXP)

# The chunk-4 chain and the dynamic-chunk chain train side by side, one thread each (two 1-thread
# runs do 1.6 steps/s each on 2 cores, one 2-thread run 2.4).
demo-input-main: setup
	$(PY) train.py stage=input_1_ctc experiment=$(EXP) trainer.num_threads=1
	$(PY) train.py stage=input_2_align experiment=$(EXP) trainer.num_threads=1

demo-input-dynamic: setup
	$(PY) train.py stage=input_1_ctc experiment=$(EXP) trainer.num_threads=1 stage.variant=dynamic encoder.dynamic_chunk=true
	$(PY) train.py stage=input_2_align experiment=$(EXP) trainer.num_threads=1 stage.variant=dynamic encoder.dynamic_chunk=true

test: setup ## the test suite (fast, CPU, no network); CI runs exactly this
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: bench-data bench-llm bench-input ## all benchmarks

bench-input: setup ## streaming encoder + adapter: cost at 1 s vs 60 s, streaming vs recompute, input-path RTF
	$(PY) -m tools.bench_input --experiment $(EXP)

bench-llm: setup ## stand-in LLM training step: fp32 vs bf16 autocast, one run
	$(PY) -m tools.bench_llm --experiment $(EXP)

bench-data: corpus ## ASR loader throughput vs plain decode + fbank on the same files
	$(PY) -m tools.bench_data --shards $(CORPUS)/shards/asr/train --cmvn $(CORPUS)/cmvn.json

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove runs/ and the corpus (keeps .venv)
	rm -rf runs $(CORPUS)
