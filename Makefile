# BlockZoo developer commands. `make serve` and `make test` each do their own setup.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
TORCH_PIN := torch==2.13.0

.PHONY: install serve test lint format typecheck pytest services clean gpu-check

# The stamp is newer than pyproject.toml (and the venv) once they are installed, so a second
# `make install` costs nothing; editing pyproject.toml or deleting .venv reinstalls.
install: $(STAMPS)/install

$(VENV)/pyvenv.cfg:
	@echo "==> creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/install: pyproject.toml $(VENV)/pyvenv.cfg
	@echo "==> installing blockzoo and its test dependencies into $(VENV)"
	@# torch first, from the CPU wheel that pip's find-links provides, so nothing pulls CUDA builds.
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	@mkdir -p $(STAMPS)
	@touch $@

serve: install
	$(BIN)/blockzoo serve --demo

services:
	@echo "==> system services (redis, postgres, chromium)"
	@scripts/ensure_services.sh

lint: install
	@echo "==> ruff check"
	$(BIN)/ruff check .
	@echo "==> ruff format --check"
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	@echo "==> mypy"
	$(BIN)/mypy

# pytest exits 5 when it collected nothing; a suite that ran no test has not passed.
pytest: install
	@echo "==> pytest"
	@$(BIN)/pytest -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# Every step runs even after an earlier one failed, so one run reports all problems.
test: install
	@failed=""; \
	for step in services lint typecheck pytest; do \
		$(MAKE) --no-print-directory $$step || failed="$$failed $$step"; \
	done; \
	if [ -n "$$failed" ]; then echo "==> FAILED:$$failed" >&2; exit 1; fi; \
	echo "==> all checks passed"

# The one short script for a lent GPU: the kernel tests on the device (the CUDA-only ones run there;
# TRITON_INTERPRET stays unset, see tests/conftest.py), then the W4A16 table. Output also goes to
# $$OUT when the device runner sets it, so the figures come back.
gpu-check: install
	@out=$${OUT:-.gpu-check}; mkdir -p $$out; \
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device')" || exit 1; \
	$(BIN)/pytest -p no:cacheprovider -q tests/kernels > $$out/gpu_tests.txt 2>&1; rc=$$?; cat $$out/gpu_tests.txt; \
	$(BIN)/python -m benchmarks.w4a16 --quick > $$out/w4a16.txt 2>&1 || rc=1; cat $$out/w4a16.txt; \
	exit $$rc

clean:
	rm -rf $(STAMPS) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
