# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Both are idempotent: Debian packages are installed only when missing, the venv only
# when pyproject.toml changed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := libnbd-bin python3-libnbd nbdkit qemu-utils fio util-linux dmsetup rsync fuse3 \
	pacemaker pacemaker-cli-utils corosync resource-agents libxml2-utils iptables \
	chromium fonts-dejavu-core gcc
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test lint debs deps bench bench-quick bench-review clean ocf-install soak fuzz compiled pure

demo: deps compiled  # KEEP=1: leave the nodes and the GUI running at the end, until Ctrl-C
	KEEP=$(KEEP) $(PY) -m volkeeper_lab.demo

PYTEST_WORKERS ?= 2
# The suite runs with the data path compiled (mypyc); then the core's own tests run again as
# pure Python, the reference the build compiles from.  VOLKEEPER_EXPECT makes a build that
# silently failed, or a fallback nobody asked for, fail the run (tests/test_compiled.py).
test: deps lint compiled  # tests that measure rates or times (marked serial) run alone, after the rest
	VOLKEEPER_EXPECT=compiled $(VENV)/bin/pytest -n $(PYTEST_WORKERS) -m "not serial"
	VOLKEEPER_EXPECT=compiled $(VENV)/bin/pytest -m serial
	VOLKEEPER_EXPECT=pure VOLKEEPER_PURE_PYTHON=1 $(VENV)/bin/pytest -n $(PYTEST_WORKERS) \
		tests/core tests/test_compiled.py

# The data path's modules compiled with mypyc into build/mypyc (volkeeper_lab/compile.py);
# rebuilt when a core source changes.  `make pure` removes the build: pure Python everywhere.
COMPILED := build/mypyc/manifest.json
compiled: $(COMPILED)
$(COMPILED): $(STAMP) src/volkeeper_lab/compile.py $(shell find src/volkeeper/core -name '*.py') \
		src/volkeeper/errors.py src/volkeeper/_compiled.py
	@mkdir -p build
	$(PY) -m volkeeper_lab.compile >build/mypyc.log 2>&1 || { tail -20 build/mypyc.log; exit 1; }
	@tail -1 build/mypyc.log

pure:
	$(PY) -m volkeeper_lab.compile --clean

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

SECONDS ?= 600
soak: deps  # the nemesis with random seeds for SECONDS (SEED=N: one schedule again); root
	$(PY) -m tests.fault.soak --seconds $(SECONDS) $(if $(SEED),--seed $(SEED)) \
		$(if $(NODES),--nodes $(NODES)) $(if $(MODE),--mode $(MODE)) \
		$(if $(FAULTS),--faults $(FAULTS)) --report soak-report

FUZZ_EXAMPLES ?= 20000
FUZZ_API_EXAMPLES ?= 500
fuzz: deps compiled  # the fuzz targets at length (make test runs a few hundred examples each)
	VOLKEEPER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) VOLKEEPER_FUZZ_API_EXAMPLES=$(FUZZ_API_EXAMPLES) \
		$(VENV)/bin/pytest -n $(PYTEST_WORKERS) tests/fuzz tests/integration/test_fuzz.py \
		tests/integration/test_peer_fuzz.py

ocf-install: deps  # the Pacemaker resource agent ocf:volkeeper:job (on every cluster node)
	$(PY) -m volkeeper ocf install

bench: deps compiled
	$(PY) bench/nbd_vs_nbdkit.py
	$(PY) bench/mirror_overhead.py
	$(PY) bench/role_changes.py
	$(PY) bench/gui_scale.py
	$(PY) bench/scale.py

bench-quick: deps compiled  # under 2 minutes, for checking a change: short runs, one of each, ratios
	$(PY) bench/nbd_vs_nbdkit.py --quick --jobs seqwrite,randwrite,syncwrite
	$(PY) bench/nbd_vs_nbdkit.py --quick --jobs randrw --size 1GiB \
		--out bench/results/nbd_vs_nbdkit-randrw.json  # cold reads need a file that is not cached
	$(PY) bench/mirror_overhead.py --quick --skip-resync --jobs randwrite,syncwrite

bench-review: deps  # the DataKeeper review's experiment: root, ~90 min (--short: ~10 min)
	$(PY) bench/review_experiment.py $(REVIEW_ARGS)

deps: debs $(STAMP)

debs:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build
