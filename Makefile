# `make test` and `make demo` work on a fresh machine: they build the venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A real Triton server for the Triton client test: nvidia-pytriton bundles tritonserver
# (python backend) in an x86_64 Linux wheel, and its backend runs only on a system
# CPython (Debian's /usr/bin/python3.11), so it gets a venv of its own. Where that
# Python is missing, or with TRITON_TEST=no, that one test is skipped.
TRITON_PY ?= /usr/bin/python3.11
TRITON_VENV ?= .venv-triton
TRITON_TEST ?= $(if $(and $(wildcard $(TRITON_PY)),$(filter x86_64,$(shell uname -m))),yes,no)
TRITON_STAMP := $(TRITON_VENV)/.installed
ifeq ($(TRITON_TEST),yes)
TEST_DEPS := $(TRITON_STAMP)
TEST_ENV := STADAPTER_PYTRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python
endif

.PHONY: venv test lint docs demo triton clean protos ffmpeg chromium gpu-check

# The docs site (mkdocs.yml, docs/), built offline; --strict turns every warning (a broken link, a page
# missing from the nav) into an error. The output folder is git-ignored. (The variable silences the theme's
# end-of-life banner, which is not about this site.)
DOCS_SITE ?= build/site

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

$(TRITON_STAMP):
	$(TRITON_PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q 'nvidia-pytriton==0.7.0' 'numpy<2' 'onnxruntime>=1.19'
	touch $(TRITON_STAMP)

venv: $(STAMP)

# Debian's ffmpeg makes the rotated, anamorphic and hostile clips of the video tests (where it is
# missing and apt cannot install it, those tests are skipped, saying why).
ffmpeg:
	@command -v ffmpeg >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ffmpeg >/dev/null; } || \
	  echo "ffmpeg is missing and could not be installed: the tests that need it will be skipped"

# Debian's chromium runs the live page (/live) headless, its camera a y4m file, in tests/frontends/test_live_page.py
# (where it is missing and apt cannot install it, that test is skipped, saying why).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "chromium is missing and could not be installed: the live page's browser test will be skipped"

# Lint and types first (ruff over the project, mypy on stadapter/, server/, clients/, export/ and training/; both configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(DOCS_SITE)

# The suite runs in TEST_WORKERS pytest processes (pytest-xdist), each taking whole test files (--dist loadfile:
# a module's shared server is started once). Much of a test's time is spent waiting on a server, a decoder or a
# clip played at real time, so two processes fill a 2-core machine; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: $(STAMP) $(TEST_DEPS) ffmpeg chromium lint docs
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

demo: $(STAMP)
	$(BIN)/python -m server.demo

# On a GPU machine: the CUDA tests, then the model side on a random ViT-B/16 (about 5 minutes on one H100), into
# gpu_check.json and a table. It names any missing wheel (PyAV, open_clip) with the commands that carry it there.
# GPU_CHECK_ARGS=--server adds the real server's integration tests.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) -m bench.gpu_check --out gpu_check.json $(GPU_CHECK_ARGS)

# A Triton model repository for the demo tasks (generated, not committed).
triton: $(STAMP)
	$(BIN)/python -m export triton --trunk model_repository/trunk --tasks model_repository/tasks/*/1 --out model_repository/triton

protos: $(STAMP)
	$(BIN)/python -m stadapter_api.generate

clean:
	rm -rf $(VENV) $(TRITON_VENV) build *.egg-info
