# fedasr: the two commands of the README.
#   make demo   set up (first run only), then run the main job on the embedded synthetic corpus
#   make test   set up (first run only), then run the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= results/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh "$(DEMO_DIR)"

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
