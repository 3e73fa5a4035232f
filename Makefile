# semrank: one entry point for set-up, demo and tests.
#   make demo   - create .venv, install everything, run the end-to-end demo
#   make test   - create .venv, install everything (the Node client's packages, the Go toolchain), run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test proto services go-toolchain clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/semrank demo

# Redis and NATS (JetStream) are used for real by the store and event-stream tests; start each on
# loopback if none answers (the machine's own are used when they run).
services:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting redis-server on 127.0.0.1:6379"; \
	  mkdir -p /tmp/semrank-redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp/semrank-redis --logfile /tmp/semrank-redis/redis.log; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done; }
	@$(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 4222), timeout=1).close()" 2>/dev/null || { \
	  echo "starting nats-server -js on 127.0.0.1:4222"; \
	  mkdir -p /tmp/semrank-nats; \
	  setsid nohup nats-server -js -a 127.0.0.1 -p 4222 -sd /tmp/semrank-nats > /tmp/semrank-nats/nats.log 2>&1 < /dev/null & \
	  for i in 1 2 3 4 5 6 7 8 9 10; do $(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 4222), timeout=1).close()" 2>/dev/null && break; sleep 0.5; done; }

# The Node.js client's dependencies, from its lock file (tests/clients/test_node_client.py runs it).
NODE_CLIENT := clients/node
$(NODE_CLIENT)/node_modules/.package-lock.json: $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error

# The Go client example is built from Debian's Go and gRPC packages (tests/clients/test_go_client.py
# runs clients/go/build.sh); apt-get installs them when missing.
GO_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev \
           protoc-gen-go protoc-gen-go-grpc
go-toolchain:
	@command -v go >/dev/null && command -v protoc-gen-go-grpc >/dev/null && [ -f /usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go ] || { \
	  echo "installing $(GO_DEBS) (Debian packages)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q --no-install-recommends $(GO_DEBS) >/dev/null || { \
	    $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends $(GO_DEBS) >/dev/null; }; }

test: setup services go-toolchain $(NODE_CLIENT)/node_modules/.package-lock.json
	$(PY) -m pytest -q

# Regenerate the committed gRPC stubs from protos/ (tests/semrank/test_proto_stubs.py fails when they drift).
proto: setup
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
	  protos/semrank/ranking/v1/ranking_service.proto

clean:
	rm -rf $(VENV) demo-out .pytest_cache $(NODE_CLIENT)/node_modules
