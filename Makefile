# One command to run the demo, one to run the tests. Both create or reuse the virtualenvs and install what they need.
#
#   .venv         everything (`.[dev]`): the services, research tools, test and lint tools, newest releases
#   .venv-client  the client-only install (no extras) on the oldest supported gRPC stack; it also holds the pinned
#                 grpcio-tools that generates mlsignal/v1
#   tests/node    the Node.js client check (@grpc/grpc-js, @grpc/proto-loader), installed from its package-lock.json
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

.PHONY: venv client-venv node-modules test lint demo protos bench bench-desk clean fuzz

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
$(NODE_STAMP): $(NODE_DIR)/package.json $(wildcard $(NODE_DIR)/package-lock.json)
	@if ! command -v $(NPM) >/dev/null 2>&1; then \
	  if [ "$$CI" = "true" ]; then echo "npm not found; CI=true requires the Node.js client checks"; exit 1; fi; \
	  echo "npm not found: skipping the Node.js client checks"; exit 0; \
	fi; \
	if [ -f $(NODE_DIR)/package-lock.json ]; then cmd=ci; else cmd=install; fi; \
	$(NPM) $$cmd --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error && touch $@

venv: $(STAMP)

client-venv: $(CLIENT_STAMP)

node-modules: $(NODE_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint $(CLIENT_STAMP) $(NODE_STAMP)
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

clean:
	rm -rf var .pytest_cache
