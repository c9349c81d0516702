# Fresh machine: `make demo` or `make test`. Both create .venv and install everything.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
TF4 ?= .tf4

.PHONY: install demo test lint clean gpu-wheels gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so pip never pulls a multi-GB CUDA build on a CPU machine
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# transformers 4.x beside the venv's 5.x: the export tests load exports with both majors
	$(PY) -m pip install -q --no-deps --target $(TF4) "transformers>=4.57,<5" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dynascope fit --config configs/tiny-relu.yaml --trainer.default_root_dir $(RUN)
	$(VENV)/bin/dynascope analyze $(RUN)
	@echo "run directory:  $(RUN)"
	@echo "snapshots:      $(RUN)/snapshots/ (manifest.jsonl lists step, tokens seen, sha256)"
	@echo "metrics:        $(RUN)/metrics.jsonl"
	@echo "wandb run:      $$(ls -d $(RUN)/wandb/*run-* | tail -1)  (upload with: wandb sync <dir>)"
	@echo "offline table:  $(RUN)/analysis/metrics.csv"
	@echo "report page:    $(RUN)/report/index.html (PNGs in $(RUN)/plots/)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(TF4) runs

# The GPU check (benchmarks/gpu_check.py), on a machine with a GPU and no network: its image's python3 (with
# torch) runs it, with what it lacks installed from .whl/, made here beforehand by `make gpu-wheels`.
GPU_PY ?= python3
GPU_SITE ?= .gpu-site
PLATFORMS := $(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64

gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(PLATFORMS) --platform any -d .whl -r benchmarks/gpu-requirements.txt

gpu-check:
	test ! -d .whl || $(GPU_PY) -m pip install -q --no-index --no-deps --upgrade --target $(GPU_SITE) .whl/*.whl
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $(GPU_SITE) .
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) benchmarks/gpu_check.py --device cuda --out gpu-check.json
