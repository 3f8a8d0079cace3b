# make help  lists the targets. Every target sets itself up (a .venv with the CPU torch wheel).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
EXP     ?= tiny
CORPUS  ?= data/tiny
PYTEST_ARGS ?=
SEED    ?=
# every training and evaluation command of the demo targets: `make demo SEED=7` trains with seed 7
EXPARGS  = experiment=$(EXP)$(if $(SEED), seed=$(SEED))

.PHONY: help setup corpus demo demo-all demo-input demo-llm demo-ctc-main demo-ctc-dynamic demo-align-main demo-align-dynamic demo-align-more demo-prompt demo-eval-asr demo-eval-qa demo-eval demo-output demo-codec demo-tokens demo-answers demo-decoder-main demo-decoder-nopre demo-prefix-main demo-prefix-nopre demo-judge demo-eval-judge demo-eval-codec demo-eval-output demo-state demo-eval-state demo-chat report test bench bench-data bench-llm bench-input bench-output bench-dialogue lint format clean

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

demo: corpus ## the embedded default, cut to 30 min (experiment=demo): the whole chain, Tables 1-3, state classifier, a spoken exchange
	$(MAKE) -j2 EXP=$(DEMO_EXP) ASR_RUNS=demo-align-main ALIGN_AFTER= DECODER_RUNS=demo-prefix-main CTC_AFTER=demo-judge demo-all

# The demo is a graph of 1-thread runs that make -j2 schedules on two cores: the stand-in LLM
# trains on one core while the intelligibility judge and then the stage-1 encoder (it needs no
# LLM) train on the other; the codec (whose validation the judge hears), its tokens, the LLM's
# answers, the stage-2/3 runs and the decoder stages start when their inputs exist; the
# evaluations run side by side. Two
# 1-thread runs do more work than one 2-thread run (e.g. 1.6 vs 2.4 steps/s for stage 1).
# `make demo` runs experiment=demo (the tiny recipe cut to 30 min, one chain per side),
# `make demo-input` / `make demo-output` the full tiny recipe of each side with both chains
# (ASR_RUNS, DECODER_RUNS). In the full recipe the dynamic-chunk encoder continues from the
# chunk-4 one for 300 steps (DYN_INIT; DYN_INIT= trains it from scratch with the stage-1 schedule).
DEMO_EXP ?= demo
ASR_RUNS ?= demo-align-main demo-align-dynamic $(ALIGN_AFTER)
DECODER_RUNS ?= demo-prefix-main demo-prefix-nopre
DYN_INIT ?= stage.init_from=[input_1_ctc@] trainer.max_steps=300 optim.warmup_steps=30
RUN1 := $(PY) train.py $(EXPARGS) trainer.num_threads=1
DYN  := stage.variant=dynamic encoder.dynamic_chunk=true

demo-llm: setup
	$(RUN1) stage=llm_text
# CTC_AFTER=demo-judge (make demo): the stand-in and the judge start first; stage 1 follows the judge on its core
# while the codec, its tokens and the decoder follow the stand-in on the other.
CTC_AFTER ?=
demo-ctc-main: setup | $(CTC_AFTER)
	$(RUN1) stage=input_1_ctc
demo-ctc-dynamic: setup | demo-ctc-main
	$(RUN1) stage=input_1_ctc $(DYN) $(DYN_INIT)
demo-align-main: setup | demo-answers demo-ctc-main
	$(RUN1) stage=input_2_align
demo-align-dynamic: setup | demo-answers demo-ctc-dynamic
	$(RUN1) stage=input_2_align $(DYN)
# The tiny recipe's stage 2 then continues for 200 more steps from its own 400-step output (a
# second, warm-restarted schedule): Table 3 0.913 against 0.890 after 400 (README: Speech
# input). `make demo` leaves it out (ALIGN_AFTER=).
ALIGN_MORE ?= stage.init_from=[input_2_align] resume=false trainer.max_steps=200 trainer.val_check_interval=200
ALIGN_AFTER ?= demo-align-more
demo-align-more: setup | demo-align-main
	$(RUN1) stage=input_2_align $(ALIGN_MORE)
demo-prompt: setup | demo-align-main $(ALIGN_AFTER)
	$(RUN1) stage=input_3_prompt
demo-eval-asr: setup | $(ASR_RUNS)
	$(PY) infer.py eval_asr $(EXPARGS) trainer.num_threads=1
demo-eval-qa: setup | demo-prompt
	$(PY) infer.py eval_spoken_qa $(EXPARGS) trainer.num_threads=1
demo-eval: demo-eval-asr demo-eval-qa
	@cat runs/$(EXP)/eval/asr.md runs/$(EXP)/eval/spoken_qa.md

demo-input: setup ## the full tiny recipe of the speech-input stages (needs the corpus; ~90 min on 2 cores), Tables 1 and 3
	$(MAKE) -j2 demo-eval

# Speech output: the judge, then the codec, train on one core while the stand-in LLM and the
# stage-1 encoder train on the other; then the decoder with and without the pre-network, their
# prefix decoders, and Table 2.
NOPRE := stage.variant=nopre speech_decoder.pre_net_layers=0
demo-codec: setup | demo-judge
	$(RUN1) stage=output_1_codec
demo-tokens: setup | demo-codec
	$(PY) -m tools.write_codec_tokens $(EXPARGS) trainer.num_threads=1 --quiet
demo-answers: setup | demo-llm
	$(PY) -m tools.make_llm_answers $(EXPARGS) trainer.num_threads=1
demo-decoder-main: setup | demo-tokens demo-llm
	$(RUN1) stage=output_2_decoder
demo-decoder-nopre: setup | demo-tokens demo-llm
	$(RUN1) stage=output_2_decoder $(NOPRE)
demo-prefix-main: setup | demo-decoder-main demo-answers
	$(RUN1) stage=output_3_prefix
demo-prefix-nopre: setup | demo-decoder-nopre demo-answers
	$(RUN1) stage=output_3_prefix $(NOPRE)
# The intelligibility judge (outside the chain) hears the codec's and the decoder's speech.
demo-judge: setup
	$(RUN1) stage=judge
demo-eval-judge: setup | demo-judge
	$(PY) infer.py eval_judge $(EXPARGS) trainer.num_threads=1
demo-eval-codec: setup | demo-codec demo-judge
	$(PY) infer.py eval_codec $(EXPARGS) trainer.num_threads=1
demo-eval-output: setup | $(DECODER_RUNS) demo-eval-judge demo-eval-codec
	$(PY) infer.py eval_speech_output $(EXPARGS) trainer.num_threads=1
	@cat runs/$(EXP)/eval/judge.md runs/$(EXP)/eval/codec.md runs/$(EXP)/eval/speech_output.md

# Duplex: the state classifier after stage 3, then a spoken exchange with the whole
# chain (two questions of a test dialogue in one file), last. The second question starts
# CHAT_PAUSE seconds after the first ends, after the spoken answer (about 2-5 s); a shorter
# pause makes it a barge-in.
CHAT_PAUSE ?= 6.0
demo-state: setup | demo-prompt
	$(RUN1) stage=input_4_state
demo-eval-state: setup | demo-state
	$(PY) infer.py eval_state $(EXPARGS) trainer.num_threads=1
demo-chat: setup | demo-state demo-prefix-main
	$(PY) -m tools.make_chat_input --corpus $(CORPUS) --out runs/$(EXP)/chat/question.wav --pause $(CHAT_PAUSE)
	$(PY) infer.py chat $(EXPARGS) trainer.num_threads=1 input_wav=runs/$(EXP)/chat/question.wav output_wav=runs/$(EXP)/chat/answer.wav

# The exchange runs beside the last evaluations; the summary prints every table once all are done.
demo-all: demo-eval demo-eval-output demo-eval-state demo-chat
	@echo "== demo summary (runs/$(EXP)/eval, runs/$(EXP)/chat)"
	@cat runs/$(EXP)/eval/asr.md runs/$(EXP)/eval/spoken_qa.md runs/$(EXP)/eval/judge.md runs/$(EXP)/eval/codec.md \
	  runs/$(EXP)/eval/speech_output.md runs/$(EXP)/eval/state.md runs/$(EXP)/chat/answer.md
	@$(PY) infer.py report $(EXPARGS) > /dev/null
	@cat runs/$(EXP)/report.md

report: setup ## the headline numbers of one experiment's evaluations -> runs/$(EXP)/report.{json,md} (EXP=demo|tiny)
	$(PY) infer.py report $(EXPARGS)

demo-output: setup ## the tiny recipe of the speech-output stages (needs the corpus): codec report and Table 2
	$(MAKE) -j2 demo-eval-output

test: setup ## the test suite (fast, CPU, no network); CI runs exactly this
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: bench-data bench-llm bench-input bench-output bench-dialogue ## all benchmarks

bench-input: setup ## streaming encoder + adapter: cost at 1 s vs 60 s, streaming vs recompute, input-path RTF
	$(PY) -m tools.bench_input --experiment $(EXP)

bench-output: setup ## speech decoder AR tokens/s, synthesis RTF, first segment -> first PCM, KV cache vs none
	$(PY) -m tools.bench_output --experiment $(EXP)

bench-dialogue: setup ## LLM step at 100 vs 2,000 tokens of context, first PCM against context, Table 4 breakdown
	$(PY) -m tools.bench_dialogue --experiment $(EXP)

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
