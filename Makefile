# otrace: `make run` serves on ./otrace.db, `make test` runs every check. Both need only python3 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test bench soak pyz docs settings prices openclaw-live clean

$(VENV)/.run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.run requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(VENV)/.run
	$(PY) -m compileall -q otrace.py      # so -m loads it compiled: 8 MiB less resident
	exec env TRACE_DB_PATH=$${TRACE_DB_PATH:-./otrace.db} $(PY) -m otrace serve

test: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Every benchmark against its same-run baseline, about 8 minutes; tables in bench/results/.
bench: $(VENV)/.dev
	$(PY) bench/run_all.py

# The long runs: a fault soak (load, SIGTERM, SIGKILL, full disk, dead and slow receiver) and
# 10 minutes of idle footprint.
soak: $(VENV)/.dev
	$(PY) scripts/soak.py --minutes 3
	$(PY) bench/ingest.py --idle-only --idle 600

# One file to deploy: otrace.py and its price table with psutil, urllib3 and python-json-logger inside
# (shiv unpacks psutil's compiled extension on first run, into ~/.shiv or $$SHIV_ROOT).
pyz: $(VENV)/.dev
	rm -rf build/pyz && mkdir -p build/pyz dist && cp otrace.py prices.json prices.LICENSE build/pyz/
	$(VENV)/bin/shiv --quiet --site-packages build/pyz --entry-point otrace:main --python '/usr/bin/env python3' \
		--reproducible --compressed --compile-pyc --output-file dist/otrace.pyz -r requirements.txt

settings: $(VENV)/.run
	@$(PY) otrace.py settings

# Rewrite README's settings table from otrace.py (a test checks they match).
docs: $(VENV)/.run
	$(PY) -c 'import re, subprocess, sys; table = subprocess.check_output([sys.executable, "otrace.py", "settings"], text=True); \
	readme = open("README.md").read(); \
	open("README.md", "w").write(re.sub(r"(?s)(<!-- settings:begin -->\n).*?(\n<!-- settings:end -->)", lambda m: m[1] + table.rstrip("\n") + m[2], readme))'

# Refresh prices.json and prices.LICENSE from the newest genai-prices release on PyPI.
prices: $(VENV)/.run
	$(PY) scripts/prices.py

# A real OpenClaw gateway (Node 24 and openclaw from npm, about 100 MB) writing the log otrace follows.
openclaw-live: $(VENV)/.run
	$(PY) scripts/openclaw_live.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist
