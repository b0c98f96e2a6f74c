# fraudscore — the two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROTO_SRC := protos/fraudscore/v1/fraudscore.proto
PROTO_OUT := protos/fraudscore/v1/fraudscore_pb2.py
MODEL_DIR ?= models/default
STAMP  := $(VENV)/.installed

.PHONY: serve test lint proto model bench clean loadtest redis-server

# The environment: created once, reinstalled when pyproject.toml or the pins change. The
# pins (constraints.txt) are the image's too, so tests run the versions the image ships.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Generated code and .pyi stubs: produced here, never edited by hand (tests/test_generated.py checks).
$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(BIN)/python protos/generate.py

proto: $(PROTO_OUT)

# Trains only when MODEL_DIR holds no model these kernels can serve (missing, or another feature set).
model: $(PROTO_OUT)
	$(BIN)/fraudscore train --out $(MODEL_DIR) --if-stale

# ARGS: more `fraudscore serve` flags, e.g. ARGS="--workers 2" (with FRAUDSCORE_STATE_URL set).
ARGS ?=
serve: model
	$(BIN)/fraudscore serve --model $(MODEL_DIR) $(ARGS)

# The whole suite: lint (ruff, mypy --strict), then every test. The shared-state tests start
# Debian's redis-server themselves (tests/redis_server.py); it is installed here where missing.
test: lint redis-server
	$(BIN)/python -m pytest

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's redis-server for the shared-state tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "the tests need redis-server (Debian: apt-get install redis-server, as root); not found" >&2; exit 1; \
	  fi; }

lint: $(PROTO_OUT)
	$(BIN)/ruff check .
	$(BIN)/mypy core service loadtest

bench: model redis-server
	$(BIN)/fraudscore bench --model $(MODEL_DIR)

# Headless locust run against a server you started (`make serve`): loopback hosts only;
# HOST=127.0.0.1:50051,127.0.0.1:50052 deals the users to several processes on one Redis.
# Latency percentiles and failures in loadtest/results/<name>_stats.csv (and _stats_history.csv,
# _failures.csv, _exceptions.csv); answers by traffic kind and decision in <name>_decisions.csv.
HOST       ?= 127.0.0.1:50051
USERS      ?= 50
SPAWN_RATE ?= 10
RUN_TIME   ?= 1m
RESULTS    ?= loadtest/results
LOADTEST_ARGS ?=
loadtest: $(PROTO_OUT)
	mkdir -p $(RESULTS)
	$(BIN)/locust -f loadtest/locustfile.py --host $(HOST) --headless -u $(USERS) -r $(SPAWN_RATE) \
		-t $(RUN_TIME) --csv $(RESULTS)/loadtest --only-summary $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info protos/fraudscore/v1/*_pb2*.py protos/fraudscore/v1/*_pb2*.pyi
