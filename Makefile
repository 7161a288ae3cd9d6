# The two entry points of README.md. Both create .venv and install passray into it first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

quickstart: install  ## the main job on the embedded default (local Ray, ./mlflow.db, digits, CPU)
	$(BIN)/python -m passray.tune

test: install  ## the whole test suite (real local Ray, real MLflow server, CPU)
	$(BIN)/python -m pytest -q

clean:
	rm -rf ray_results mlflow.db mlartifacts outputs .pytest_cache
