# Fresh machine: `make demo` or `make test`. Both create .venv and install everything.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so pip never pulls a multi-GB CUDA build on a CPU machine
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
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
	rm -rf $(VENV) runs
