# kv_cache_manager_v2 build/test entry points.
#
#   make dev        .venv + editable install (dev mode, interpreted) + rawref, hostcopy built
#   make build      compile the package with mypyc IN PLACE (production mode in the tree)
#   make compiled   compiled copy of the package in build/compiled/ (tree stays in dev mode)
#   make test       mypy --strict, test suite in dev mode, then in compiled mode (build/compiled)
#   make demo       fake engine simulation on the compiled build
#   make bench      benchmarks/manager_overhead.py (dev vs compiled)
#   make mypy | clean | distclean
#
# Only python3 (>= 3.11), a C compiler and make are needed; everything else is
# installed into .venv from PyPI.

PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
ABS_PYTHON := $(CURDIR)/$(PYTHON)
DEV_STAMP := $(VENV)/.dev-stamp
COMPILED := build/compiled
COMPILED_STAMP := $(COMPILED)/.stamp

PKG_SOURCES := $(shell find kv_cache_manager_v2 -name '*.py' -not -path '*/__pycache__/*' 2>/dev/null)
RAWREF_SOURCES := $(wildcard rawref/*.c rawref/*.h rawref/*.py rawref/*.pyi)
HOSTCOPY_SOURCES := $(wildcard hostcopy/*.c hostcopy/*.py hostcopy/*.pyi)

# copytree SRC DST: replace DST by a copy of SRC without caches/build products
# (python instead of rsync: a fresh machine may not have rsync).
COPYTREE = $(PYTHON) -c 'import shutil, sys; \
shutil.rmtree(sys.argv[2], ignore_errors=True); \
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns( \
    "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache", ".hypothesis", *sys.argv[3:]))'

.PHONY: all dev clean-inplace build compiled mypy test test-dev test-compiled demo bench \
        clean distclean

all: dev

# ---------------------------------------------------------------------------
# dev mode
# ---------------------------------------------------------------------------

$(DEV_STAMP): pyproject.toml setup.py $(RAWREF_SOURCES) $(HOSTCOPY_SOURCES)
	@echo "== setting up $(VENV) (dev mode) =="
	@if [ ! -x $(PYTHON) ]; then \
	    $(PY) -m venv $(VENV) || { \
	        echo "venv with pip failed; retrying --without-pip + system pip"; \
	        rm -rf $(VENV) && $(PY) -m venv --without-pip $(VENV) && \
	        $(PY) -m pip --python $(PYTHON) install pip; }; \
	fi
	$(PYTHON) -m pip install --upgrade pip "setuptools>=70" wheel
	$(PYTHON) -m pip install --no-build-isolation -e '.[dev,plot]'
	@touch $@

dev: $(DEV_STAMP)
	@$(MAKE) --no-print-directory clean-inplace
	@$(PYTHON) -c 'import rawref._rawref, hostcopy._hostcopy'
	@echo "dev mode ready ($(PYTHON))"

# remove compiled artifacts built in place so the tree runs interpreted
clean-inplace:
	@find kv_cache_manager_v2 \( -name '*.so' -o -name '*.pyd' \) -delete 2>/dev/null || true
	@rm -f ./*__mypyc*.so ./*__mypyc*.pyd
	@rm -rf build/lib* build/temp*

# ---------------------------------------------------------------------------
# production (mypyc) mode
# ---------------------------------------------------------------------------

build: dev
	@echo "== mypyc build in place (the tree is now in compiled mode; 'make dev' reverts) =="
	$(PYTHON) setup_mypyc.py build_ext --inplace
	@$(PYTHON) -c 'import kv_cache_manager_v2 as k; assert k.is_compiled(), k.__file__; \
	    print("compiled mode in place:", k.__file__)'

# Compiled copy in build/compiled/, rebuilt only when the package sources change.
$(COMPILED_STAMP): $(DEV_STAMP) $(PKG_SOURCES) setup_mypyc.py pyproject.toml
	@echo "== compiled build in $(COMPILED) (mypyc; this takes a while) =="
	@mkdir -p $(COMPILED)
	@$(COPYTREE) kv_cache_manager_v2 $(COMPILED)/kv_cache_manager_v2 '*.so' '*.pyd' '*.c'
	@$(COPYTREE) rawref $(COMPILED)/rawref
	@$(COPYTREE) hostcopy $(COMPILED)/hostcopy
	@cp setup_mypyc.py pyproject.toml $(COMPILED)/
	@rm -f $(COMPILED)/*__mypyc*.so
	cd $(COMPILED) && $(ABS_PYTHON) setup_mypyc.py build_ext --inplace
	@touch $@

# benchmarks/ is deliberately NOT copied: the scripts run from the repository
# (`make bench` passes --compiled-dir), and tests that look for them walk up from
# tests/ to the repository's benchmarks/, whose dev mode must be the source tree.
compiled: $(COMPILED_STAMP)
	@for d in fake_engine tests rawref hostcopy; do \
	    if [ -d $$d ]; then $(COPYTREE) $$d $(COMPILED)/$$d; fi; \
	done
	@rm -rf $(COMPILED)/benchmarks
	@cp pyproject.toml $(COMPILED)/
	@cd $(COMPILED) && $(ABS_PYTHON) -c 'import kv_cache_manager_v2 as k, os; \
	    assert k.is_compiled() and os.path.abspath(k.__file__).startswith(os.getcwd()), k.__file__; \
	    print("compiled build ready:", os.path.dirname(k.__file__))'

# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------

mypy: dev
	$(PYTHON) -m mypy --strict kv_cache_manager_v2

test-dev: dev
	KVCM_EXPECT_COMPILED=0 $(PYTHON) -m pytest tests -q

# Run from inside build/compiled: cwd comes first on sys.path, so the compiled
# copy shadows the editable dev install.
test-compiled: compiled
	cd $(COMPILED) && KVCM_EXPECT_COMPILED=1 $(ABS_PYTHON) -m pytest tests -q

test: dev
	$(PYTHON) -m mypy --strict kv_cache_manager_v2
	KVCM_EXPECT_COMPILED=0 $(PYTHON) -m pytest tests -q
	@$(MAKE) --no-print-directory compiled
	cd $(COMPILED) && KVCM_EXPECT_COMPILED=1 $(ABS_PYTHON) -m pytest tests -q

demo: dev
	@$(MAKE) --no-print-directory compiled
	cd $(COMPILED) && $(ABS_PYTHON) -m fake_engine simulate

bench: dev
	@$(MAKE) --no-print-directory compiled
	$(PYTHON) benchmarks/manager_overhead.py --compiled-dir $(COMPILED)

# ---------------------------------------------------------------------------

clean: clean-inplace
	rm -rf build .mypy_cache .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
	rm -f rawref/*.so rawref/*.pyd hostcopy/*.so hostcopy/*.pyd
	rm -f $(DEV_STAMP)

distclean: clean
	rm -rf $(VENV)
