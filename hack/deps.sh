#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine: Go
# modules always; Debian packages only when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=()
command -v ip >/dev/null || pkgs+=(iproute2)
# The host-firewall tests (test/e2e/hostfw_test.go) drive both.
command -v iptables >/dev/null || pkgs+=(iptables)
command -v nft >/dev/null || pkgs+=(nftables)
if [ ${#pkgs[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing packages ${pkgs[*]}: run as root to install them" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
fi
go mod download
# make lint's checklocks analyzer, a module of its own.
(cd hack/checklocks && go mod download)
