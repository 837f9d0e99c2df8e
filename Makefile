# Two entry points for a fresh machine (see README):
#   make demo   - set up .venv, fetch the offline Qwen pair, run SemAlign v1 on the default pair
#   make test   - set up .venv and run the test suite (tiny random models, no downloads)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.semalign-installed

.PHONY: setup demo test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exactly pinned: the machine's CPU wheel (a loose torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: SemAlign v1 on the default pair (Qwen2.5-Coder 1.5B -> 0.5B, MMLU), with a stratified 57-question
# MMLU evaluation (one per subject) of teacher / student before / student after.
DEMO_ARGS ?= --eval-tasks mmlu --eval-limit 57
demo: $(STAMP)
	$(BIN)/semalign transfer $(DEMO_ARGS) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_semalign_v1.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
