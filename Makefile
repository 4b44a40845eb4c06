# The README's two commands: `make demo` and `make test`. Both build their own virtual environment.
VENV ?= .venv
PIP = $(VENV)/bin/pip

.PHONY: venv demo test bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[worker,test]'
	touch $@

demo: venv
	$(VENV)/bin/salient demo --out salient-demo

# The pipeline tests start real Redis, PostgreSQL and SeaweedFS (S3) servers, and the report test drives a
# real headless Chromium: install them first.
test: venv
	bash tests/servers/install.sh $(VENV)
	bash tests/browser_install.sh
	$(VENV)/bin/python -m pytest -q
