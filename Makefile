# shm-cni: build, test, fuzz, benchmark, demo.
#
#   make test    everything CI runs (needs root: network namespaces, TAP,
#                containerd): lint, build, unit and e2e tests, tier 1 (e2e-cri)
#   make demo    a node in a box with traffic (needs root)
#   make bench   shm-cni beside a veth pair and the ptp/bridge plugins (needs root;
#                BENCH_FLAGS=... for subsets, see go run ./test/bench -h)
#   make bench-endpoint  the endpoint micro-benchmarks beside gVisor's
#   make bench-hostile   well-behaved pods' throughput beside a hostile sandbox
#   make fuzz    every fuzz target for FUZZTIME each
#   make image   the container image as a docker archive, $(IMAGE_ARCHIVE),
#                tagged $(IMAGE_TAG), without a Docker engine (hack/image)
#   make e2e-cri    containerd + runc pods on shm-cni (needs root; test/e2e/cri)
#   make e2e-runsc  gVisor runsc pods beside runc pods (needs root; builds ~10-40 min once)
#   make e2e-k8s    a one-node Kubernetes on deploy/ and make image (needs root; builds ~15 min once)
#   make bench-runsc  runsc and runc pods over shm-cni and the bridge plugin
#                (needs root and tier 2's builds; test/e2e/cri/bench-runsc.sh)
#   make kind-node-image  a kind node image without a registry (needs root;
#                hack/kind-node-image.sh, after hack/cri-deps.sh kind)
#   make e2e-kind  three-node kind cluster on shm-cni (needs root; starts and
#                stops its own Docker engine; E2E=1 adds Kubernetes'
#                [sig-network] [Conformance] tests; test/e2e/kind/run.sh)
#   make e2e-kind-netpol  the same with Kubernetes' NetworkPolicy tests

GO       ?= go
BIN      ?= bin
FUZZTIME ?= 60s
BENCH_FLAGS ?=
IMAGE_TAG ?= shm-cni:dev
IMAGE_ARCHIVE ?= $(BIN)/shm-cni-image.tar
# Packages with fuzz targets and their targets, as pkg:Target.
FUZZ_TARGETS ?= \
	./pkg/queue:FuzzServer \
	./pkg/endpoint/shm:FuzzHostileClient \
	./pkg/endpoint/shm:FuzzHostileOffloadClient \
	./pkg/endpoint/shm:FuzzCoalesce \
	./pkg/endpoint/tap:FuzzTAPFrame \
	./pkg/endpoint/tap:FuzzTAPPassGSO \
	./pkg/router:FuzzSplitSuper \
	./pkg/endpoint/shm:FuzzParseLinkConfig \
	./pkg/ipam:FuzzParseState \
	./pkg/agentapi:FuzzDecodeRequest \
	./pkg/agentapi:FuzzDecodeResponse \
	./pkg/agentapi:FuzzServeConn \
	./pkg/cni:FuzzParseConfig \
	./pkg/cni:FuzzPodKind \
	./pkg/cni:FuzzPrevResult \
	./pkg/cni:FuzzAgentAnswer \
	./pkg/agent:FuzzParseRecord \
	./pkg/policy:FuzzTable \
	./pkg/policy:FuzzCompile \
	./pkg/policy:FuzzTracker \
	./pkg/router:FuzzFilter \
	./pkg/router:FuzzClampMSS \
	./pkg/router:FuzzLargeLinks \
	./test/e2e/node:FuzzParseSinkLine \
	./test/e2e/node:FuzzParseSentLine

.PHONY: all build deps test test-unit test-full lint fuzz bench bench-snapshot bench-runsc-snapshot bench-endpoint bench-hostile demo image clean

all: build

deps:
	@hack/deps.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# lint also runs gVisor's checklocks analyzer (hack/checklocks, a module of
# its own pinned to the product's gVisor) over every +checklocks annotation.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@want=$$(grep -h '^\s*gvisor.dev/gvisor ' go.mod); got=$$(grep -h '^\s*gvisor.dev/gvisor ' hack/checklocks/go.mod); \
	if [ -z "$$want" ] || [ "$$want" != "$$got" ]; then echo "hack/checklocks/go.mod pins$$got, go.mod$$want: make them agree"; exit 1; fi
	cd hack/checklocks && $(GO) build -o $(CURDIR)/$(BIN)/checklocks .
	$(GO) vet -vettool=$(CURDIR)/$(BIN)/checklocks -inferred=false -wrappers=false ./...

# test-unit runs every test under the race detector (big transfers and the
# churn are scaled down there); test-full runs the long real-traffic tests
# and the churn of 1000 pods at full size, and the flood test where the
# agent is fast enough to meet its link limit.
test-unit:
	$(GO) test -race -count=1 -timeout 20m ./...

test-full:
	$(GO) test -count=1 -timeout 20m -run 'TwoProcess|Interop|Forwarding|TCPInProcess' ./pkg/endpoint/shm
	$(GO) test -count=1 -timeout 20m -run '^(TestChurn|TestHostileFlood)$$' ./test/e2e

test: deps lint build test-unit test-full e2e-cri

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "== $$name ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 2s -parallel 1 $$pkg; \
	done

# bench writes $(BIN)/bench.md, bench.json and bench.svg; never part of test.
# bench-snapshot copies make bench's latest results into docs/bench, the
# committed snapshot; bench-runsc-snapshot copies make bench-runsc's. Apart,
# so that a partial run of one (NETWORKS=..., REPS=...) left in $(BIN) never
# rides along with a snapshot of the other.
bench: deps
	@hack/bench-deps.sh
	$(GO) run ./test/bench -out $(BIN) $(BENCH_FLAGS)

bench-snapshot:
	@test -f $(BIN)/bench.md || { echo "no $(BIN)/bench.md: run make bench first"; exit 1; }
	cp $(BIN)/bench.md $(BIN)/bench.json $(BIN)/bench.svg docs/bench/

bench-runsc-snapshot:
	@test -f $(BIN)/bench-runsc.md || { echo "no $(BIN)/bench-runsc.md: run make bench-runsc first"; exit 1; }
	cp $(BIN)/bench-runsc.md docs/bench/

bench-endpoint: deps
	@mkdir -p $(BIN)
	$(GO) test -run '^$$' -bench QueuePPS -benchtime 2000000x -count 3 ./pkg/endpoint/shm | tee $(BIN)/bench-endpoint.txt
	$(GO) test -run '^$$' -bench TCPThroughput -benchtime 512x -count 3 ./pkg/endpoint/shm | tee -a $(BIN)/bench-endpoint.txt
	$(GO) test -run '^$$' -bench RTT -benchtime 5000x -count 3 ./pkg/endpoint/shm | tee -a $(BIN)/bench-endpoint.txt

# bench-hostile: the well-behaved pods' throughput beside a hostile sandbox
# (each misbehaviour), as ratios to the same pods alone, in one run.
bench-hostile: deps
	SHM_CNI_MEASURE=1 $(GO) test -count=1 -timeout 30m -run '^TestMeasureHostileNeighbour$$' -v ./test/e2e | grep -v 'level=' | tee $(BIN)/bench-hostile.txt

demo: deps
	@hack/demo.sh

# image builds static binaries with the Dockerfile's flags and writes the
# image the Dockerfile describes; load it with `kind load image-archive` or
# `ctr -n k8s.io images import`.
image:
	$(GO) run ./hack/image -o $(IMAGE_ARCHIVE) --tag $(IMAGE_TAG)

# The container-runtime tiers (test/e2e/cri): real runtimes driving shm-cni.
.PHONY: e2e-cri e2e-runsc e2e-k8s bench-runsc
e2e-cri: deps
	@test/e2e/cri/tier1.sh

e2e-runsc: deps
	@test/e2e/cri/tier2-runsc.sh

# e2e-k8s needs deploy/shm-cni.yaml and the image target (make image).
e2e-k8s: deps
	@test/e2e/cri/tier3-k8s.sh

.PHONY: kind-node-image e2e-kind e2e-kind-netpol
kind-node-image: deps
	@hack/cri-deps.sh kind
	@hack/kind-node-image.sh

e2e-kind: deps
	@test/e2e/kind/run.sh

# e2e-kind-netpol: the kind tier and Kubernetes' NetworkPolicy e2e tests
# (all but SCTP connectivity, which needs a kernel with SCTP; ~20 min).
e2e-kind-netpol: deps
	@E2E=1 FOCUS='\[sig-network\] Netpol' SKIP='\[Feature:SCTPConnectivity\]|\[Serial\]|\[Disruptive\]' test/e2e/kind/run.sh

# bench-runsc writes $(BIN)/bench-runsc.md; never part of test.
bench-runsc: deps
	@test/e2e/cri/bench-runsc.sh

clean:
	rm -rf $(BIN)
