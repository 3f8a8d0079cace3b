# make help  lists the targets. Every target sets itself up (a .venv with the CPU torch wheel).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
EXP     ?= tiny
CORPUS  ?= data/tiny
PYTEST_ARGS ?=

.PHONY: help setup corpus demo demo-input demo-llm demo-ctc-main demo-ctc-dynamic demo-align-main demo-align-dynamic demo-prompt demo-eval-input test bench bench-data bench-llm bench-input lint format clean

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

demo: corpus ## the embedded default: corpus, stand-in LLM, the speech-input stages, Tables 1 and 3
	$(MAKE) -j2 demo-eval-input

# The demo is a graph of 1-thread training runs that make -j2 schedules on two cores: the
# stand-in LLM trains beside the chunk-4 and then the dynamic-chunk encoder (stage 1 needs no
# LLM); each stage-2 run starts when both its inputs exist. Two 1-thread runs do more work than
# one 2-thread run (e.g. 1.6 vs 2.4 steps/s for stage 1).
RUN1 := $(PY) train.py experiment=$(EXP) trainer.num_threads=1
DYN  := stage.variant=dynamic encoder.dynamic_chunk=true

demo-llm: setup
	$(RUN1) stage=llm_text
demo-ctc-main: setup
	$(RUN1) stage=input_1_ctc
demo-ctc-dynamic: setup | demo-ctc-main
	$(RUN1) stage=input_1_ctc $(DYN)
demo-align-main: setup | demo-llm demo-ctc-main
	$(RUN1) stage=input_2_align
demo-align-dynamic: setup | demo-llm demo-ctc-dynamic
	$(RUN1) stage=input_2_align $(DYN)
demo-prompt: setup | demo-align-main
	$(RUN1) stage=input_3_prompt
demo-eval-input: setup | demo-prompt demo-align-dynamic
	$(PY) infer.py eval_input experiment=$(EXP)

demo-input: setup ## speech input only (needs the corpus): the demo without the corpus step
	$(MAKE) -j2 demo-eval-input

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
