# rlchat developer entry points. `make demo` and `make test` set everything up on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch, pinned; pip takes it from wherever it is pointed (a CPU wheel on CI's disk). On Linux PyPI's default is the
# multi-GB CUDA build: `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"` for the CPU one.
TORCH ?= torch==2.13.0

.PHONY: setup browser postgres demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,minilm]"
	touch $@

# Debian's Chromium drives the web-page test (Playwright uses it; it never downloads a browser). Best effort:
# without root or apt the test is skipped with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 || echo "note: chromium not installed; the web-page test will be skipped"; }

# Debian's PostgreSQL server binaries for the feedback-store tests: the test fixture runs initdb / pg_ctl itself, as an
# unprivileged user in a temp dir, on a free port (no system service is used). Without them the PostgreSQL half of
# those tests is skipped with its reason; under CI (CI=true) a failed install fails the run instead.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) >/dev/null 2>&1 || { echo "note: postgresql not installed; the PostgreSQL feedback-store tests will be skipped"; [ -z "$$CI" ] || exit 1; }; }

demo: setup
	$(VENV)/bin/rlchat demo

test: setup browser postgres
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --timeout=900 --durations=25

test-fast: setup postgres
	$(PY) -m pytest -q -m "not slow" --timeout=300

# ruff, then the layer rules of docs/ARCHITECTURE.md as import contracts ([tool.importlinter] in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/tokenizer_throughput.py
	$(PY) bench/generation.py
	$(PY) bench/env_step.py
	$(PY) bench/sft_step.py
	$(PY) bench/ppo_throughput.py
	$(PY) bench/serve_load.py
	$(PY) bench/serve_text.py
	$(PY) bench/serve_soak.py
	$(PY) bench/batch_generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
