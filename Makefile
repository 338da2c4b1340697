# Two entry points: `make serve` and `make test`. Both build .venv once;
# a second run finds the stamp files and reinstalls nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install model cpu-kernels arctic-inference browser go-peers triton-gpu-image test serve bench clean

$(VENV)/.torch-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	touch $@

$(VENV)/.install-stamp: $(VENV)/.torch-stamp pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.install-stamp

model: install
	$(VENV)/bin/pagedinfer prepare-model

# The C++ CPU kernels (kernels/cpu/), compiled once into torch's
# extension cache (about a minute); later runs only load them. Without a
# compiler the engine falls back to the torch references (tests/test_cpu_kernels.py fails).
cpu-kernels: install
	$(PY) -m kernels.cpu_ops || echo "CPU kernels not built: the engine will use the torch reference ops"

# Suffix decoding's trees come from Snowflake's arctic-inference (what vLLM
# uses). PyPI has only its sdist, and pip's isolated build of it fails (the
# build env's CMake 4 cannot find Python's Development.Module), so it is
# built here once, without isolation and with CMake < 4, into a wheel cache
# keyed by version and Python (~/.cache/pagedinfer/wheels); a venv then
# installs that wheel with --no-deps (its declared dependencies are vLLM's).
# setup.py imports torch: the build venv sees .venv's, after its own
# packages. Without a compiler `make` goes on, and start-up refuses
# `{"method": "suffix"}` with one line.
ARCTIC_INFERENCE := 0.3.0
PAGEDINFER_CACHE := $(HOME)/.cache/pagedinfer
WHEEL_CACHE := $(PAGEDINFER_CACHE)/wheels
ARCTIC_BUILD_VENV := $(PAGEDINFER_CACHE)/arctic-inference-build
$(VENV)/.arctic-inference-stamp-$(ARCTIC_INFERENCE): $(VENV)/.torch-stamp
	@tag=$$($(PY) -c 'import sys; print("cp%d%d" % sys.version_info[:2])'); \
	wheel=$$(ls $(WHEEL_CACHE)/arctic_inference-$(ARCTIC_INFERENCE)-$$tag-*.whl 2>/dev/null | head -n1); \
	if [ -z "$$wheel" ]; then \
	  echo "building arctic-inference $(ARCTIC_INFERENCE) into $(WHEEL_CACHE) (once)"; \
	  { [ -x $(ARCTIC_BUILD_VENV)/bin/pip ] || { $(PYTHON) -m venv $(ARCTIC_BUILD_VENV) && \
	    $(ARCTIC_BUILD_VENV)/bin/pip install --quiet nanobind==2.9.2 'cmake<4' ninja setuptools wheel \
	      grpcio-tools protobuf==5.29.6; }; } && \
	  PATH=$(ARCTIC_BUILD_VENV)/bin:$$PATH \
	  PYTHONPATH=$$($(ARCTIC_BUILD_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'):$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
	  $(ARCTIC_BUILD_VENV)/bin/pip wheel --quiet --no-deps --no-build-isolation --no-binary arctic-inference \
	    -w $(WHEEL_CACHE) arctic-inference==$(ARCTIC_INFERENCE) && \
	  wheel=$$(ls $(WHEEL_CACHE)/arctic_inference-$(ARCTIC_INFERENCE)-$$tag-*.whl | head -n1); \
	fi; \
	if [ -n "$$wheel" ] && $(PY) -m pip install --quiet --no-deps --force-reinstall "$$wheel"; then touch $@; \
	else echo "arctic-inference not built: the suffix speculative method is unavailable"; fi

arctic-inference: $(VENV)/.arctic-inference-stamp-$(ARCTIC_INFERENCE)

# The console tests drive Debian's chromium (browser downloads are impossible
# here); CI runs as root and gets it from apt when it is missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

# The tests' Go peers (tests/tools/: Jaeger, llm-d's KV-cache indexer) are
# built by the tests themselves, once, into ~/.cache/pagedinfer/go-tools;
# llm-d's indexer links Debian's libzmq, which CI (root) gets from apt.
go-peers:
	@pkg-config --exists libzmq 2>/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends libzmq3-dev pkg-config; }

# The GPU image's Triton (3.6), beside the venv's, for the compile check in
# tests/test_kernels.py: kernels are compiled for sm_80/sm_90 with the
# compiler the GPU runs. Its compile cache (~/.cache/pagedinfer/triton-gpu-image)
# makes a second `make test` cost seconds for it.
TRITON_GPU_IMAGE := 3.6.0
$(VENV)/triton-gpu-image/.stamp-$(TRITON_GPU_IMAGE): $(VENV)/.torch-stamp
	rm -rf $(VENV)/triton-gpu-image
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/triton-gpu-image triton==$(TRITON_GPU_IMAGE)
	touch $@

triton-gpu-image: $(VENV)/triton-gpu-image/.stamp-$(TRITON_GPU_IMAGE)

test: model cpu-kernels arctic-inference browser go-peers triton-gpu-image
	$(PY) -m pytest $(PYTEST_ARGS)

serve: model cpu-kernels arctic-inference
	$(VENV)/bin/pagedinfer serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
