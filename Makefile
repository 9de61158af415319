# The README's two commands: `make demo` and `make test`. Both install what is missing first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap test lint demo bench deb clean

bootstrap:
	@scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: bootstrap lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: bootstrap
	@scripts/demo.sh

bench: bootstrap
	$(PY) -m bench

deb: bootstrap
	@packaging/build-deb.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
