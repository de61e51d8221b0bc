# otrace: `make run` serves on ./otrace.db, `make test` runs every check. Both need only python3 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: help run test bench soak pyz docs settings prices openclaw-live clean

help:  ## list the targets (the default)
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.run requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(VENV)/.run  ## serve on 127.0.0.1:9090 (OTLP also on :4318), database ./otrace.db
	$(PY) -m compileall -q otrace.py      # so -m loads it compiled: far less resident than compiling it
	exec env TRACE_DB_PATH=$${TRACE_DB_PATH:-./otrace.db} $(PY) -m otrace serve

test: $(VENV)/.dev  ## ruff, then every test (about 4 minutes on 2 cores)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 4 --dist loadgroup   # four workers on 2 cores: most tests wait on a process

# About half an hour: each benchmark runs in a budget (bench/run_all.py).
bench: $(VENV)/.dev  ## every benchmark against its same-run baseline; tables in bench/results/
	$(PY) bench/run_all.py

# The long runs: a fault soak (load, SIGTERM, SIGKILL, full disk, dead and slow receiver) pushing
# otrace's format, then OTLP, and 10 minutes of idle footprint.
soak: $(VENV)/.dev  ## as root: the fault soak in both push formats, then 10 minutes of idle footprint
	$(PY) scripts/soak.py --minutes 3
	$(PY) scripts/soak.py --minutes 3 --format otlp
	$(PY) bench/ingest.py --idle-only --idle 600

# One file to deploy: otrace.py and its price table with the packages of requirements.txt inside (shiv
# unpacks them on first run, into ~/.shiv or $$SHIV_ROOT: protobuf and zstandard are compiled extensions),
# at the versions the tests ran with in .venv.
pyz: $(VENV)/.dev  ## dist/otrace.pyz: otrace and its packages in one file
	rm -rf build/pyz && mkdir -p build/pyz dist && cp otrace.py LICENSE prices.json prices.LICENSE build/pyz/
	$(VENV)/bin/pip freeze --disable-pip-version-check --exclude-editable > build/tested.txt
	$(VENV)/bin/shiv --quiet --site-packages build/pyz --entry-point otrace:main --python '/usr/bin/env python3' \
		--reproducible --compressed --compile-pyc --output-file dist/otrace.pyz -r requirements.txt --constraint build/tested.txt

settings: $(VENV)/.run  ## print the settings table (Markdown)
	@$(PY) otrace.py settings

# A test checks that docs/settings.md's table is what otrace.py prints.
docs: $(VENV)/.run  ## write docs/settings.md's table from otrace.py
	$(PY) -c 'import re, subprocess, sys; table = subprocess.check_output([sys.executable, "otrace.py", "settings"], text=True); \
	doc, found = re.subn(r"(?s)(<!-- settings:begin -->\n).*?(\n<!-- settings:end -->)", lambda m: m[1] + table.rstrip("\n") + m[2], open("docs/settings.md").read()); \
	found == 1 or sys.exit("make docs: docs/settings.md needs one <!-- settings:begin --> ... <!-- settings:end --> pair"); \
	open("docs/settings.md", "w").write(doc)'

# Refresh prices.json and prices.LICENSE from the newest genai-prices release on PyPI, and pin the
# tests' genai-prices to it.
prices: $(VENV)/.run  ## refresh prices.json from the newest genai-prices release
	$(PY) scripts/prices.py

# A real OpenClaw gateway (Node 24 and openclaw from npm, about 100 MB) writing the log otrace follows.
openclaw-live: $(VENV)/.run  ## otrace beside a real OpenClaw gateway (Node 24 and openclaw from npm)
	$(PY) scripts/openclaw_live.py

clean:  ## remove .venv, caches, build/ and dist/
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist
