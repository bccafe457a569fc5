# k8s-gpu-monitor: the two commands are `make demo` and `make test`.
# Both install what they need on a fresh Debian 12 machine with Python 3.11.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Rebuilt whenever pyproject.toml changes.
VENV_STAMP := $(VENV)/.installed-from-pyproject

.PHONY: help system-deps venv crd-schemas lint test demo docs golden bench proto rules dashboards clean distclean

help:
	@echo "make demo         run a simulated GPU fleet, its exporters and a real Prometheus"
	@echo "make test         linters, then the whole test suite (installs what it needs)"
	@echo "make lint         ruff check, ruff format --check, mypy"
	@echo "make docs         regenerate docs/metrics.md (exporter catalogue, analytics /metrics)"
	@echo "make golden       regenerate the golden exposition files"
	@echo "make bench        run the exporter scrape benchmark"
	@echo "make proto        regenerate the kubelet pod-resources gRPC code"
	@echo "make rules        regenerate rules/pricing.yml and the GPU rules and alerts (monitoring/values.yaml)"
	@echo "make dashboards   regenerate the Grafana dashboards in dashboards/"
	@echo "make system-deps  apt-get install prometheus, alertmanager and victoria-metrics if missing"
	@echo "make venv         create .venv and install the project with test extras"
	@echo "make crd-schemas  npm-install the prometheus-operator CRD validators the chart tests use"
	@echo "make clean        remove caches and demo state (distclean: the venv too)"

system-deps:
	@DEBIAN_FRONTEND=noninteractive bash scripts/install-system-deps.sh

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "python3.11 or python3 is required" >&2; exit 1; }
	@if [ ! -x $(VENV_PY) ]; then \
		echo "creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

# prometheus-operator CRD validators (npm, versions locked in tests/helm/package-lock.json) for
# the Helm chart tests; installs Node.js and npm from Debian when missing.
CRD_SCHEMAS := .cache/crd-schemas
CRD_STAMP := $(CRD_SCHEMAS)/.installed

crd-schemas: $(CRD_STAMP)

$(CRD_STAMP): tests/helm/package.json tests/helm/package-lock.json tests/helm/install-crd-schemas.sh
	bash tests/helm/install-crd-schemas.sh $(CRD_SCHEMAS)
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# pytest exits 5 when it collects nothing; that is a failure, never a pass.
test: system-deps venv crd-schemas lint
	@rc=0; $(VENV)/bin/pytest || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	exit $$rc

demo: system-deps venv
	$(VENV_PY) scripts/demo.py

docs: venv
	$(VENV_PY) -m analytics.metrics_doc > docs/metrics.md.tmp
	@mv docs/metrics.md.tmp docs/metrics.md
	@echo "wrote docs/metrics.md"

golden: venv
	UPDATE_GOLDEN=1 $(VENV)/bin/pytest tests/unit -k golden

bench: venv
	@if [ -f bench/exporter_scrape.py ]; then \
		$(VENV_PY) -m bench.exporter_scrape; \
	else \
		echo "bench/exporter_scrape.py does not exist yet: nothing to run"; \
	fi

proto: venv
	bash scripts/gen-podresources.sh

rules: venv
	$(VENV_PY) -m analytics.pricing --pricing examples/pricing.yaml --out rules/pricing.yml
	$(VENV_PY) -m analytics.pricing --pricing examples/pricing.yaml --shared-gpu-split usage \
		--out rules/tests/pricing_usage.yml
	$(VENV_PY) -m monitoring.rules

dashboards: venv
	$(VENV_PY) -m monitoring.dashboards

clean:
	rm -rf .demo build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache docs/metrics.md.tmp .cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
