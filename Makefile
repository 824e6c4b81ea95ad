# The two README commands: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-all test-wheel bench bench-nnunet bench-outofcore venv clean

venv: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml constraints.txt slab/transforms/_fill.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# a venv made before the rename holds the old `slab` distribution and its import mappings
	$(PY) -m pip uninstall --quiet --yes slab 2>/dev/null || true
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bundle,dicom]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slab demo --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# the sdist and the wheel built from it, installed into a fresh venv and used outside the checkout
test-wheel: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_wheel.py

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "" tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bundle,dicom,bench]'
	for b in benchmarks/bench_*.py; do case $$b in */bench_outofcore.py|*/bench_vs_nnunet.py) ;; *) $(PY) $$b || exit 1;; esac; done

# slab and nnU-Net v2 at equal CPU seconds (nnU-Net in its own venv, .nnunet-venv; ~40 minutes on 2 cores)
bench-nnunet: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bundle,dicom,bench]'
	$(PY) benchmarks/bench_vs_nnunet.py

# A 6 GiB volume under a 1.5 GiB memory cgroup (root; about 35 minutes on 2 cores).
bench-outofcore: $(STAMP)
	$(PY) benchmarks/bench_outofcore.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
