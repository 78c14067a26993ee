# Two commands on a fresh machine: `make demo` and `make test` create the environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-kd test test-slow test-all bench clean

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

## The main job: the lingudistill demo, quick form (one seed at full scale; prints the recovery table)
demo: $(STAMP)
	$(BIN)/vlmdistill demo lingudistill -- --quick

## The kd demo (teacher trained on real text, student with vs without distillation)
demo-kd: $(STAMP)
	$(BIN)/vlmdistill demo kd

## Fast test suite (tests marked slow are skipped)
test: $(STAMP)
	$(BIN)/python -m pytest

## Only the slow tests (multi-process DDP, experiment smoke runs)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: test test-slow

bench: $(STAMP)
	$(BIN)/python -m vlmdistill.eval.bench.bench_kd

clean:
	rm -rf runs build *.egg-info .pytest_cache
