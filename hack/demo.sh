#!/usr/bin/env bash
# The node in a box: builds shm-cni, shm-agent and the sandbox program, runs
# them in network namespaces of their own (the machine's network is not
# touched), prints the connectivity matrix and throughput per pair kind, and
# cleans up. Needs root. Arguments go to the demo (-size MiB, -v).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: needs root (network namespaces, TUN/TAP, nftables)" >&2
	exit 2
fi
exec go run ./test/e2e/nodebox "$@"
