# Two commands do everything on a fresh machine:  make demo   and   make test
# (each creates .venv and installs what is missing first).

VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tailstream-installed
# The editable install maps streams/, models/, producers/ into `tailstream.*` through a
# link farm (setuptools strict mode): it must be redone when modules are added or removed.
MODULES := $(shell find src streams models producers bench -name '*.py' 2>/dev/null | sort)
MODLIST := $(VENV)/.tailstream-modules
SECONDS ?= 60
ARGS    ?=

.PHONY: install demo test lint unit integration bench services clean FORCE

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(MODLIST): FORCE | $(PY)
	@echo "$(MODULES)" | cmp -s - $@ || echo "$(MODULES)" > $@

$(STAMP): pyproject.toml $(MODLIST) | $(PY)
	@# CPU torch from this machine's disk first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip show -q torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

demo: install
	$(BIN)/tailstream demo --seconds $(SECONDS) --summary-json demo-summary.json $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy -p tailstream

# Services the suite runs for real that no wheel ships (Prometheus, promtool): installed
# with apt-get when missing and possible, else the tests that need them say so and skip.
services:
	@./.ci/install-services

test: lint services
	$(BIN)/pytest $(ARGS)

unit: install
	$(BIN)/pytest tests/unit $(ARGS)

integration: install
	$(BIN)/pytest tests/integration $(ARGS)

bench: install
	mkdir -p bench-out
	$(BIN)/tailstream bench finetune --json bench-out/finetune.json
	$(BIN)/tailstream bench serve --json bench-out/serve.json

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache var demo-summary.json
