#!/usr/bin/env bash
# bench-deps.sh installs what `make bench` needs beyond `make deps`: iperf3
# (Debian's package), the kernel-stack ends' throughput tool.
set -euo pipefail

if command -v iperf3 >/dev/null 2>&1; then
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "bench-deps: iperf3 is missing and there is no apt-get; install iperf3" >&2
	exit 1
fi
echo "bench-deps: installing iperf3"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends iperf3 >/dev/null
