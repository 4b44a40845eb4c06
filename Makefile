# The README's two commands: `make demo` and `make test`. Both build their own virtual environment.
VENV ?= .venv
PIP = $(VENV)/bin/pip

.PHONY: venv demo test lint bench

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

# ruff: lint and import order. mypy: types of producer/, workers/ and storage/ under their import names, through a
# tree of links (mypy cannot follow the editable install's package-dir mapping).
TYPECHECK = build/typecheck
lint: venv
	$(VENV)/bin/ruff check producer workers storage salient_maps
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/salient_maps
	ln -s $(CURDIR)/salient_maps/__init__.py $(CURDIR)/salient_maps/py.typed $(TYPECHECK)/salient_maps/
	for part in producer storage workers; do ln -s $(CURDIR)/$$part $(TYPECHECK)/salient_maps/$$part; done
	$(VENV)/bin/mypy
