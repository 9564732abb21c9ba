# Two entry points: `make demo` (set up + run the whole job on the embedded synthetic data)
# and `make test` (set up + run the test suite). Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# pyproject.toml: lower bounds; constraints.txt: the exact tested set. sam2 is an sdist whose build imports torch:
# it is built second, against the torch and setuptools installed first (build isolation would fetch another
# torch), without its optional CUDA extension, so no CUDA toolchain is needed. It also installs SAM 2's own
# training code as a top-level `training` package, which would shadow ours: removed (README, "Install")
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,slit]" setuptools
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q -c constraints.txt --no-build-isolation -e ".[sam2]"
	rm -rf "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/training"
	touch $(STAMP)

.PHONY: install demo test test-fast browser bench bench-real
install: $(STAMP)

# the report test renders the HTML report in headless Chromium (Debian's package)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the report rendering test will be skipped"

demo: $(STAMP)
	$(BIN)/protomask demo --out demo

test: $(STAMP) browser
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q

# the performance figures of docs/performance.md (about 5 minutes on 2 cores)
bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m bench.run_all

# docs/results.md: cub_dev segmented once, ProtoMask, the patch baseline and both black-boxes trained with
# configs/small-cpu.yaml on 2 workers (alone from a fresh clone: 16 min on a fast 2-core machine, 33-64 min on slower ones)
bench-real: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python bench/real_photos.py

test-fast: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -m "not slow"
