# Two commands on a fresh machine: `make demo` and `make test` create the environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-kd test test-slow test-all lint bench gpu-check clean

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

## Lint (ruff; its configuration is in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .

## Only the slow tests (multi-process DDP, experiment smoke runs)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: test test-slow

bench: $(STAMP)
	$(BIN)/python -m vlmdistill.eval.bench.bench_kd

## Every GPU measurement in one command (about 8 minutes on one H100 / H200; a dry run of the plumbing in
## seconds without CUDA): results.json + results.md in $(GPU_CHECK_OUT). Needs only torch with CUDA, triton,
## transformers, accelerate, peft and safetensors: it installs this package with --no-deps if it is not there.
GPU_CHECK_OUT ?= runs/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	@$(GPU_PYTHON) -c "import vlmdistill.eval.gpu_check" 2>/dev/null || \
	  $(GPU_PYTHON) -m pip install --no-deps --no-build-isolation -e . >/dev/null || \
	  { echo "gpu-check: could not install the package (pip install --no-deps --no-build-isolation -e .)"; exit 2; }
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(GPU_PYTHON) -m vlmdistill.eval.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs build *.egg-info .pytest_cache
