#!/usr/bin/env bash
# Tier 2 of the runtime tests (make e2e-runsc): gVisor. containerd v2 built
# from the module proxy (Debian's 1.6 cannot drive the current runsc shim),
# runsc and containerd-shim-runsc-v1 built from gvisor.dev/gvisor (the shim
# patched to tolerate EPERM on oom_score_adj; hack/cri-deps.sh runsc), pods
# with the runtime handler runsc beside runc pods, all on shm-cni TAP links
# (kind tap) and the real shm-agent in the host network namespace.
#
# runsc runs with network=sandbox: at sandbox start it scrapes the pod
# netns (the TAP device eth0, its address, routes and neighbours), removes
# the address from the kernel's device, opens an AF_PACKET socket on it and
# serves the pod's TCP/IP from gVisor's netstack inside the sandbox. Frames
# then go sandbox netstack -> AF_PACKET -> TAP -> the agent's fd -> the
# agent's router: the pod kernel's IP stack is never used.
#
# Checks, each printed as PASS or FAIL:
#   - the runsc pod runs in gVisor (its kernel log), sees eth0 with the
#     address CRI reports, and the kernel's eth0 in the pod netns has no
#     address any more (runsc took the device over);
#   - runsc <-> runc pod and runsc <-> runsc pod TCP both ways (each server
#     sees the client's pod address) and 4 MiB transfers with matching MD5;
#   - host -> runsc pod, runsc pod -> host, runsc pod -> outside
#     (masqueraded to the host's address);
#   - 10 runsc pods created and removed: nothing left (as in tier 1).
# The first run builds runsc, the shim and containerd (about 10 minutes on
# two cores); later runs reuse bin/cri. Needs root.
set -euo pipefail
# shellcheck source=test/e2e/cri/lib.sh
. "$(dirname "$0")/lib.sh"

CHURN=${CHURN:-10}
HOST_PORT=18080
CTRD2=$CRI_BIN/containerd2

need_root
lock
sweep_stale
trap on_exit EXIT
trap 'exit 130' INT TERM

say "deps (runsc, containerd v2: built once)"
"$REPO/hack/cri-deps.sh" runsc
setup_scratch
say "build ($S)"
build
say "outside namespace, agent"
setup_outside
start_agent
write_conflist 1.1.0
write_runsc_config "log_level = \"debug\"
log_path = \"$S/logs/runsc/shim-%ID%.log\"" "  net-raw = \"true\"
  debug-log = \"$S/logs/runsc/%ID%/\""
write_containerd_config 2 true
say "containerd $("$CTRD2/containerd" --version | awk '{print $3}'), runsc $(cat "$CRI_BIN/runsc.version")"
start_containerd "$CTRD2/containerd" "$CTRD2/ctr"

say "a runc pod and two runsc pods"
run_server_pod k
run_server_pod g1 runsc
run_server_pod g2 runsc
for p in k g1 g2; do wait_serving "${CTR[$p]}"; done
say "runc pod k ${IP[k]}, runsc pods g1 ${IP[g1]}, g2 ${IP[g2]}, host $GATEWAY"

check "pod g1 runs in gVisor (its kernel log)" 1 "$(in_pod "${CTR[g1]}" 'dmesg' | grep -c 'Starting gVisor')"
check "pod k runs on the host kernel" 0 "$(in_pod "${CTR[k]}" 'dmesg 2>/dev/null' 2>/dev/null | grep -c 'Starting gVisor')"
check "pod g1: gVisor's eth0 carries the CRI address" "${IP[g1]}/32" "$(in_pod "${CTR[g1]}" "ip -4 -o addr show dev eth0 | awk '{print \$4}'")"
netns=$(crictl_ inspectp "${POD[g1]}" | grep -m1 '"NetNSPath"' | cut -d'"' -f4)
if [ -n "$netns" ] && [ -e "$netns" ]; then
	check "pod g1: its netns' kernel eth0 is the TAP device" 1 "$(nsenter --net="$netns" ip -d link show dev eth0 | grep -c 'tun type tap')"
	check "pod g1: runsc took the TAP's address off the kernel" "" "$(nsenter --net="$netns" ip -4 -o addr show dev eth0)"
else
	fail "pod g1: no netns path from CRI (${netns:-none})"
fi

check "runsc g1 -> runc k TCP, k sees g1's address" "${IP[g1]}" "$(in_pod "${CTR[g1]}" "$(peer_cmd "${IP[k]}" 8080)")"
check "runc k -> runsc g1 TCP, g1 sees k's address" "${IP[k]}" "$(in_pod "${CTR[k]}" "$(peer_cmd "${IP[g1]}" 8080)")"
check "runsc g1 -> runsc g2 TCP, g2 sees g1's address" "${IP[g1]}" "$(in_pod "${CTR[g1]}" "$(peer_cmd "${IP[g2]}" 8080)")"
check "runsc g1 <- runc k 4 MiB, MD5" "$(in_pod "${CTR[k]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[g1]}" "$(blob_cmd "${IP[k]}")")"
check "runc k <- runsc g1 4 MiB, MD5" "$(in_pod "${CTR[g1]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[k]}" "$(blob_cmd "${IP[g1]}")")"
check "runsc g2 <- runsc g1 4 MiB, MD5" "$(in_pod "${CTR[g1]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[g2]}" "$(blob_cmd "${IP[g1]}")")"

check "host -> runsc g1 TCP, g1 sees the host's uplink address" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[g1]}" 8080)")"
check "host <- runsc g1 4 MiB, MD5" "$(in_pod "${CTR[g1]}" 'cat /www/blob.md5')" "$(/bin/busybox sh -c "$(blob_cmd "${IP[g1]}")")"
start_host_server host "" "$GATEWAY" "$HOST_PORT"
check "runsc g1 -> host TCP, the host sees g1's address" "${IP[g1]}" "$(in_pod "${CTR[g1]}" "$(peer_cmd "$GATEWAY" "$HOST_PORT")")"
start_host_server outside "$OUTSIDE_NS" "$OUTSIDE_PEER" 8080
check "runsc g1 -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[g1]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"

say "remove the pods"
agent_baseline "the pods"

say "$CHURN runsc pods"
for i in $(seq "$CHURN"); do
	pod_json "churn-$i"
	crictl_ runp --runtime runsc "$S/pods/churn-$i.json" >/dev/null 2>>"$S/logs/churn.log" || true
done
check "CRI: runsc pods ready" "$CHURN" "$(crictl_ pods -q --state ready | wc -l)"
check "agent: attachments" "$CHURN" "$(attachments_count)"
remove_pods
check_nothing_left
# runsc keeps one "null-netns" mount in its root for all sandboxes.
check "runsc: no sandbox left in its root" "" "$(find "$S/runsc/root" -mindepth 2 ! -name null-netns ! -name "*.lock" -printf "%f ")"

say "teardown"
teardown_and_verify
finish "tier 2 (containerd v2, runsc, shm-cni)"
