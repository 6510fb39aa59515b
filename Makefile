# Set-up and the two everyday commands. Each target creates (or reuses) the virtual environment
# with the pinned install from constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rdpo-installed

.PHONY: venv quickstart test test-fast lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt torch torchvision
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The main job on the embedded default (tiny Qwen2-VL + synthetic shapes task, CPU).
quickstart: venv
	$(PY) -m rdpo.fit --config configs/quickstart.yaml $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# ruff, then the test suite. pytest exits 5 when it collected no test: that means the suite
# went missing (a bad path, a broken conftest), so it is reported and fails loudly.
test: lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The unit layer alone, for every edit: no end-to-end training (fit, the rdpo.fit CLI, DDP,
# SLURM, TRL, benchmarks: marker `slow`) and no CUDA (marker `gpu`). Under 90 s on 2 cores.
test-fast: venv
	@$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf .cache/rdpo runs build dist *.egg-info
