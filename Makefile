# dbtask: `make demo` shows it working, `make test` proves it. `make help` lists every target.

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
# cargo usually lives in ~/.cargo/bin, which a non-login shell (CI) may not have on PATH.
export PATH := $(VENV)/bin:$(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo
WORKER_BIN := $(ROOT)/target/release/dbtask-worker
# The client's extension is built by maturin in its own target dir: maturin builds pyo3 as an
# extension module (PYO3_BUILD_EXTENSION_MODULE), which would rebuild the worker's pyo3 each time.
MATURIN_TARGET := $(ROOT)/target/maturin
# make bench-peers: Celery, Dramatiq, Taskiq and arq (bench/peers/requirements*.txt), apart from .venv.
PEERS_VENV := $(ROOT)/bench/peers/.venv

.DEFAULT_GOAL := help
.PHONY: help setup venv build build-worker build-client demo test test-fast test-chaos test-containers image wheels test-dist test-rust test-py lint bench bench-peers clean distclean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z_-]+:.*?## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Install what is missing: redis-server (apt), .venv with pinned tools and nats-server
	@bash $(ROOT)/scripts/setup.sh

venv: setup ## Same as setup: the .venv/ with maturin, pytest and nats-server (pinned)

build: build-worker build-client ## Build the worker (release) and install the client into .venv

build-worker: setup ## Build target/release/dbtask-worker
	cd $(ROOT) && $(CARGO) build --release -p dbtask-worker

build-client: setup ## Build the Python client (release) and install it into .venv
	cd $(ROOT)/client-py && VIRTUAL_ENV=$(VENV) CARGO_TARGET_DIR=$(MATURIN_TARGET) \
		$(VENV)/bin/maturin develop --release --quiet

demo: build ## Start private NATS + Redis + a worker on examples/, run the example clients
	@bash $(ROOT)/scripts/demo.sh

test: build ## Set up, build, then run cargo test and every pytest suite; non-zero on any failure
	@bash $(ROOT)/scripts/test.sh

test-fast: build ## Under a minute once built: Rust unit tests and the client's tests without the slow ones
	cd $(ROOT) && $(CARGO) test --workspace --lib
	cd $(ROOT) && $(VENV)/bin/pytest client-py/tests -q -p no:cacheprovider -m "not slow"

test-chaos: build ## The chaos tests: servers killed under load (a few minutes; CI runs them after make test)
	@bash $(ROOT)/scripts/test.sh --chaos

test-containers: build ## Build the worker's image and run it with podman (installs podman; CI runs it after make test)
	@bash $(ROOT)/scripts/test-containers.sh

image: build ## Container image of the worker (deploy/Dockerfile) from the host's builds: IMAGE=, BASE=, CONTAINER=
	@bash $(ROOT)/scripts/image.sh

wheels: build ## The dbtask wheels (client + worker) into dist/, for each CPython 3.10-3.13 found; PYTHONS= to choose
	@bash $(ROOT)/scripts/wheels.sh $(PYTHONS)

test-dist: build ## Build wheels for two Python versions, install each in a fresh venv, run a task (CI runs it)
	@bash $(ROOT)/scripts/test-dist.sh

test-rust: setup ## Only cargo test --workspace
	cd $(ROOT) && $(CARGO) test --workspace

test-py: build ## Only the pytest suites (end-to-end tests/ and client-py/tests/)
	@bash $(ROOT)/scripts/test.sh --python-only

lint: setup ## cargo fmt --check and cargo clippy -D warnings
	cd $(ROOT) && $(CARGO) fmt --all -- --check
	cd $(ROOT) && $(CARGO) clippy --workspace --all-targets -- -D warnings

bench: build ## Benchmark W1-W6 against the real worker and a Rust-only baseline; report in bench/results/
	cd $(ROOT) && $(CARGO) build --release -p dbtask-bench-baseline
	cd $(ROOT) && $(VENV)/bin/python bench/run.py

# The harness imports the dbtask client of make build through a .pth: its package folder (the
# editable install's), with the extension in it.
bench-peers: build ## W1-W6 on dbtask and on Celery, Dramatiq, Taskiq, arq in one run (installs them into bench/peers/.venv); minutes
	test -x $(PEERS_VENV)/bin/pip || $(VENV)/bin/python -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q -r $(ROOT)/bench/peers/requirements.txt
	$(PEERS_VENV)/bin/pip install -q --no-deps -r $(ROOT)/bench/peers/requirements-arq.txt
	echo "$(ROOT)/client-py/python" > "$$($(PEERS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dbtask-repo.pth"
	cd $(ROOT) && $(PEERS_VENV)/bin/python bench/peers/compare.py

clean: ## Remove build outputs and caches (keeps .venv)
	cd $(ROOT) && $(CARGO) clean
	find $(ROOT) -path $(VENV) -prune -o \( -name __pycache__ -o -name .pytest_cache \) -type d -print0 \
		| xargs -0 rm -rf
	rm -f $(ROOT)/client-py/python/dbtask/_dbtask*.so

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
