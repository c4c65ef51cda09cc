# shm-cni: build, test, fuzz, benchmark, demo.
#
#   make test    everything CI runs (needs root: network namespaces, TAP)
#   make demo    a node in a box with traffic (needs root)
#   make bench   shm-cni beside a veth pair and the ptp/bridge plugins (needs root;
#                BENCH_FLAGS=... for subsets, see go run ./test/bench -h)
#   make bench-endpoint  the endpoint micro-benchmarks beside gVisor's
#   make fuzz    every fuzz target for FUZZTIME each

GO       ?= go
BIN      ?= bin
FUZZTIME ?= 60s
BENCH_FLAGS ?=
# Packages with fuzz targets and their targets, as pkg:Target.
FUZZ_TARGETS ?= \
	./pkg/queue:FuzzServer \
	./pkg/endpoint:FuzzHostileClient \
	./pkg/endpoint:FuzzTAPFrame \
	./pkg/endpoint:FuzzTAPPassGSO \
	./pkg/endpoint:FuzzParseLinkConfig \
	./pkg/ipam:FuzzParseState \
	./pkg/agentapi:FuzzDecodeRequest \
	./pkg/cni:FuzzParseConfig \
	./pkg/agent:FuzzParseRecord

.PHONY: all build deps test test-unit test-full lint fuzz bench bench-endpoint demo clean

all: build

deps:
	@hack/deps.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# test-unit runs every test under the race detector (big transfers are scaled
# down there); test-full runs the long real-traffic tests at full size.
test-unit:
	$(GO) test -race -count=1 -timeout 20m ./...

test-full:
	$(GO) test -count=1 -timeout 20m -run 'TwoProcess|Interop|Forwarding|TCPInProcess' ./pkg/endpoint

test: deps lint build test-unit test-full

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "== $$name ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 2s -parallel 1 $$pkg; \
	done

# bench writes $(BIN)/bench.md and $(BIN)/bench.json; never part of test.
bench: deps
	@hack/bench-deps.sh
	$(GO) run ./test/bench -out $(BIN) $(BENCH_FLAGS)

bench-endpoint: deps
	@mkdir -p $(BIN)
	$(GO) test -run '^$$' -bench QueuePPS -benchtime 2000000x -count 3 ./pkg/endpoint | tee $(BIN)/bench-endpoint.txt
	$(GO) test -run '^$$' -bench TCPThroughput -benchtime 512x -count 3 ./pkg/endpoint | tee -a $(BIN)/bench-endpoint.txt
	$(GO) test -run '^$$' -bench RTT -benchtime 5000x -count 3 ./pkg/endpoint | tee -a $(BIN)/bench-endpoint.txt

demo: deps
	@hack/demo.sh

clean:
	rm -rf $(BIN)
