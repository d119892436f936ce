# One command to run the demo, one to run the tests. Both create or reuse the virtualenvs and install what they need.
#
#   .venv         everything (`.[dev]`): the services, research tools, test and lint tools, newest releases
#   .venv-client  the client-only install (no extras) on the oldest supported gRPC stack; it also holds the pinned
#                 grpcio-tools that generates mlsignal/v1
#   tests/node    the Node.js client check (@grpc/grpc-js, @grpc/proto-loader), installed from its package-lock.json
#   system        Debian packages the tests use: PostgreSQL 15 (initdb, pg_ctl), Node.js and npm, chattr (e2fsprogs)
#
# Under CI (CI=true, as .ci/run runs) a test that would skip because something is missing fails instead
# (tests/conftest.py), so everything a test needs is installed here.
PYTHON ?= python3
NPM    ?= npm

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

CLIENT_VENV  := .venv-client
CLIENT_BIN   := $(CLIENT_VENV)/bin
CLIENT_STAMP := $(CLIENT_VENV)/.installed
# The oldest supported stack, from its one definition in mlsignal/protogen.py.
OLDEST_GRPC     := $(shell sed -n 's/^OLDEST_GRPC = "\(.*\)"$$/\1/p' mlsignal/protogen.py)
OLDEST_PROTOBUF := $(shell sed -n 's/^OLDEST_PROTOBUF = "\(.*\)"$$/\1/p' mlsignal/protogen.py)
CLIENT_PINS := grpcio==$(OLDEST_GRPC) grpcio-health-checking==$(OLDEST_GRPC) protobuf==$(OLDEST_PROTOBUF) \
               grpcio-tools==$(OLDEST_GRPC) pytest
NODE_DIR   := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
# .venv-client holds a regular (not editable) install, as users get it: reinstall when the packaged code changes.
PACKAGE_FILES := $(shell find mlsignal shared training_service inference_service -type f \
                   \( -name '*.py' -o -name '*.pyi' -o -name '*.mako' \) -not -path '*/__pycache__/*')

# The Debian packages, installed with apt-get when one is missing and this runs as root (as CI does). Otherwise a
# missing package is named and the tests that need it skip, except under CI=true, where this step fails.
PG_BIN          := /usr/lib/postgresql/15/bin
SYSTEM_PACKAGES := $(if $(wildcard $(PG_BIN)/initdb),,postgresql-15) \
                   $(if $(shell command -v node),,nodejs) $(if $(shell command -v npm),,npm) \
                   $(if $(shell command -v chattr),,e2fsprogs) $(if $(shell command -v runuser),,util-linux)

.PHONY: venv client-venv node-modules system-packages test lint demo protos bench bench-desk bench-desk-fleet bench-fleet clean fuzz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CLIENT_STAMP): pyproject.toml mlsignal/protogen.py $(PACKAGE_FILES)
	@test -n "$(OLDEST_GRPC)" -a -n "$(OLDEST_PROTOBUF)" || { echo "cannot read the pins from mlsignal/protogen.py"; exit 1; }
	test -x $(CLIENT_BIN)/python || { $(PYTHON) -m venv $(CLIENT_VENV) && \
	                                  $(CLIENT_BIN)/python -m pip install --quiet --upgrade pip; }
	rm -rf build  # setuptools' build directory would carry deleted modules into the new install
	$(CLIENT_BIN)/python -m pip install --quiet . $(CLIENT_PINS)  # pip always reinstalls a local project
	rm -rf build
	touch $(CLIENT_STAMP)

# `npm ci` installs exactly the locked versions (and fails when package.json and the lock disagree); without a
# lock, `npm install` resolves package.json and writes one. Without npm, skip: the Node.js tests skip themselves
# then, except under CI=true, where both this step and those tests fail.
$(NODE_STAMP): $(NODE_DIR)/package.json $(wildcard $(NODE_DIR)/package-lock.json) | system-packages
	@if ! command -v $(NPM) >/dev/null 2>&1; then \
	  if [ "$$CI" = "true" ]; then echo "npm not found; CI=true requires the Node.js client checks"; exit 1; fi; \
	  echo "npm not found: skipping the Node.js client checks"; exit 0; \
	fi; \
	if [ -f $(NODE_DIR)/package-lock.json ]; then cmd=ci; else cmd=install; fi; \
	$(NPM) $$cmd --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error && touch $@

system-packages:
	@missing="$(strip $(SYSTEM_PACKAGES))"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	elif [ "$$CI" = "true" ]; then \
	  echo "missing Debian packages: $$missing; CI=true needs them (run as root, with apt-get)"; exit 1; \
	else \
	  echo "missing Debian packages: $$missing (the tests that need them skip; as root: apt-get install $$missing)"; \
	fi

venv: $(STAMP)

client-venv: $(CLIENT_STAMP)

node-modules: $(NODE_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint system-packages $(CLIENT_STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest -q

# The RPC fuzzer at length (`make test` runs it with 300 examples): generated requests for every RPC of both services.
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP)
	MLSIGNAL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -s tests/integration/test_fuzz.py

demo: $(STAMP)
	$(BIN)/mlsignal demo

# Regenerate mlsignal/v1 from protos/ with the pinned grpcio-tools (run from the checkout, so the checkout's
# generator writes into the checkout).
protos: $(CLIENT_STAMP)
	$(CLIENT_BIN)/python -m mlsignal.protogen

bench: $(STAMP)
	$(BIN)/python -m bench.inference

bench-desk: $(STAMP)
	$(BIN)/python -m bench.desk

# A fleet on one replica: 1,000 markets, each with its own serving model and one open stream.
bench-desk-fleet: $(STAMP)
	$(BIN)/python -m bench.desk --markets 1000 --idle-seconds 60 --promotion-check

# 100 markets retrained through the training service, on the local executor and on a Dask LocalCluster.
bench-fleet: $(STAMP)
	$(BIN)/python -m bench.fleet

clean:
	rm -rf var .pytest_cache
