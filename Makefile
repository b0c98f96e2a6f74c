# fraudscore — the two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROTO_SRC := protos/fraudscore/v1/fraudscore.proto
PROTO_OUT := protos/fraudscore/v1/fraudscore_pb2.py
MODEL_DIR ?= models/default
STAMP  := $(VENV)/.installed

.PHONY: serve test lint proto model bench clean

# The environment: created once, reinstalled when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Generated code and .pyi stubs: produced here, never edited by hand (tests/test_generated.py checks).
$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(BIN)/python protos/generate.py

proto: $(PROTO_OUT)

# Trains only when MODEL_DIR holds no model these kernels can serve (missing, or another feature set).
model: $(PROTO_OUT)
	$(BIN)/fraudscore train --out $(MODEL_DIR) --if-stale

serve: model
	$(BIN)/fraudscore serve --model $(MODEL_DIR)

# The whole suite: lint (ruff, mypy --strict), then every test.
test: lint
	$(BIN)/python -m pytest

lint: $(PROTO_OUT)
	$(BIN)/ruff check .
	$(BIN)/mypy core service loadtest

bench: model
	$(BIN)/fraudscore bench --model $(MODEL_DIR)

clean:
	rm -rf $(VENV) build *.egg-info protos/fraudscore/v1/*_pb2*.py protos/fraudscore/v1/*_pb2*.pyi
