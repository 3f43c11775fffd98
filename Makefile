# llava-ray: `make demo` runs the main job on the embedded default; `make test` runs every test tier.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test cluster-test lint bench bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; \
		print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['lmms'])")
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llava-ray demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check components pipelines serve tests benchmarks .ci
	$(VENV)/bin/ruff format --check components pipelines serve tests benchmarks .ci
	$(PY) .ci/fmt_skips.py components pipelines serve tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 --junitxml=.pytest_cache/junit.xml --ignore=tests/cluster tests
	$(PY) -m pytest -q --durations=5 --junitxml=.pytest_cache/junit-cluster.xml tests/cluster
	$(PY) .ci/tier_times.py .pytest_cache/junit.xml .pytest_cache/junit-cluster.xml

# the two-node tier alone: a real second Ray node in network and mount namespaces (needs root)
cluster-test: $(STAMP)
	$(PY) -m pytest -q --durations=5 tests/cluster

# every benchmark's --quick run, its output shown as it runs
bench: $(STAMP)
	for b in benchmarks/[!_]*.py; do $(PY) $$b --quick || exit 1; done

# every benchmark's --quick run: fails on a crash, a hang (a bound per benchmark) or no figure line
bench-smoke: $(STAMP)
	$(PY) .ci/bench_smoke.py

clean:
	rm -rf demo_out runs .pytest_cache
