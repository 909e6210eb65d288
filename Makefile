# Two entry points (see README.md): `make demo` and `make test`.
# Both build the virtual environment .venv on first use (Python 3.11, pip only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_output

.PHONY: demo test venv browser lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/klever-nb demo --out $(DEMO_OUT)

# Browser tests drive Debian's Chromium (never `playwright install`: it downloads).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); \
	  else echo "note: /usr/bin/chromium missing and not root: browser tests will be skipped"; fi; \
	fi

test: venv browser
	$(PY) -m ruff check klever_nb tests benchmarks
	$(PY) -m pytest -n 2 --dist loadgroup --doctest-modules tests klever_nb

lint: venv
	$(PY) -m ruff check klever_nb tests benchmarks

bench: venv
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
