#!/usr/bin/env bash
# Tier 2 of the runtime tests (make e2e-runsc): gVisor. containerd v2 built
# from the module proxy (Debian's 1.6 cannot drive the current runsc shim),
# runsc and containerd-shim-runsc-v1 built from gvisor.dev/gvisor with the
# patch series hack/runsc/*.patch (hack/cri-deps.sh runsc), and the real
# shm-agent in the host network namespace. Three runtime handlers:
#
#   runc       runc pods, on shm-cni TAP links (kind tap, the conflist's);
#   runsc      runsc pods on TAP links: runsc (network=sandbox) scrapes the
#              pod netns (the TAP eth0, its address, routes, neighbours),
#              removes the address from the kernel's device, opens an
#              AF_PACKET socket on it and serves the pod's TCP/IP from
#              gVisor's netstack in the sandbox: sandbox netstack ->
#              AF_PACKET -> TAP -> the agent's fd -> the agent's router;
#   runsc-shm  runsc pods on shared-memory links, set up as the README's
#              recipe says: runsc with --sharedmem-links, and as the
#              handler's own CNI config (cni_conf_dir) the same conflist
#              with kind shm, so the pods need no annotation or CNI args.
#              runsc finds the placeholder eth0 marked with its attach
#              socket (alias sharedmem:<socket>), dials it and hands the
#              queue pair to the Sentry, whose NIC is gVisor's sharedmem
#              client: sandbox netstack -> shared memory -> the agent's
#              router; no AF_PACKET socket, no device.
#
# Checks, each printed as PASS or FAIL:
#   - the runsc pod runs in gVisor (its kernel log), sees eth0 with the
#     address CRI reports, and the kernel's eth0 in the pod netns has no
#     address any more (runsc took the device over);
#   - runsc <-> runc pod and runsc <-> runsc pod TCP both ways (each server
#     sees the client's pod address) and 4 MiB transfers with matching MD5;
#   - host -> runsc pod, runsc pod -> host, runsc pod -> outside
#     (masqueraded to the host's address);
#   - runsc-shm pods: in gVisor, eth0 with the CRI address; the pod netns
#     holds the placeholder marked with the attach socket, without its
#     address, and no AF_PACKET socket (the TAP pod's netns holds one); the
#     Sentry maps the queue pair's 8 regions; the agent sees the sandboxes
#     connected (shm_cni_link_up);
#   - runsc-shm <-> runc, <-> runsc on TAP, <-> runsc-shm, <-> host TCP both
#     ways (each server sees the client's pod address); 16 MiB both ways
#     with runc, runsc on TAP, runsc-shm and the host, with matching MD5;
#     runsc-shm -> outside masqueraded; the agent's metrics count at least
#     those bytes each way on the shm link, and no protocol violation; the
#     Sentry's stream to a runc pod (MSS 1460) reaches the agent in frames
#     larger than a segment on average (TCP segmentation offload, txGSO),
#     and the runc pod's stream reaches the Sentry the same way (the
#     kernel's super-packets with partial checksums, rxGSO);
#   - IPv6 (the node is dual-stack, POD_CIDR6): every pod has an address
#     from the IPv6 pod CIDR, gVisor's eth0 of a runsc-shm pod carries it;
#     runsc-shm <-> runsc-shm, <-> runc, runsc on TAP -> runsc-shm TCP (each
#     server sees the client's IPv6 address), 4 MiB with MD5 from a runsc-shm
#     pod to a runsc-shm pod, a runc pod and the host;
#   - agent restarts, SIGTERM then SIGKILL, the agent started again on its
#     state directory, under two busy TCP connections (a numbered line every
#     50 ms over one connection, echoed back: runsc-shm s1 -> runsc-shm s2,
#     runc k -> runsc-shm s1): runsc left one link watcher per runsc-shm pod;
#     after each restart both shm links are up again (the watcher reattached
#     them), both connections carry on, new connections work; in the end
#     every line came back in order, 4 MiB with MD5 after the restarts, no
#     protocol violation. The longest pause of each connection around each
#     restart is logged, not asserted (the echoes with their times are kept
#     in the logs, busy-*.out);
#   - 10 runsc pods and 10 runsc-shm pods created and removed: nothing left
#     (as in tier 1), no link watcher left.
# The first run builds runsc, the shim and containerd (about 10 minutes on
# two cores); later runs reuse bin/cri. Needs root.
set -euo pipefail
# shellcheck source=test/e2e/cri/lib.sh
. "$(dirname "$0")/lib.sh"

CHURN=${CHURN:-10}
# A dual-stack node: the IPv6 checks of the runsc-shm pods.
POD_CIDR6=${POD_CIDR6:-fd00:213::/64}
HOST_PORT=18080
CTRD2=$CRI_BIN/containerd2
BIG=16777216 # bytes of the large transfers: 16 MiB

# netns_of POD: the pod's netns path as CRI reports it.
netns_of() { crictl_ inspectp "$1" | grep -m1 '"NetNSPath"' | cut -d'"' -f4; }
# packet_sockets NETNS: the AF_PACKET sockets open in the netns.
packet_sockets() { nsenter --net="$1" cat /proc/net/packet | tail -n +2 | wc -l; }
# sentry_of NETNS: the PID of the runsc sandbox process (runsc boot: the
# Sentry) in the netns; the platform's stub processes share the netns.
sentry_of() {
	local ino p
	ino=$(stat -L -c %i "$1")
	for p in /proc/[0-9]*; do
		[ "$(stat -L -c %i "$p/ns/net" 2>/dev/null)" = "$ino" ] || continue
		tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q ' boot ' && echo "${p#/proc/}"
	done
	return 0
}
# link_metric NAME POD: the agent's metric NAME for POD's link, summed over
# its label sets.
link_metric() {
	http_get "$METRICS_ADDR" /metrics | awk -v n="$1{" -v p="pod=\"$2\"" \
		'index($0, n) == 1 && index($0, p) {s += $NF} END {printf "%d", s}'
}
# big_cmd ADDR PORT: the MD5 of /big from ADDR:PORT, fetched with nc.
big_cmd() { printf '%s' "printf 'GET /big HTTP/1.0\r\n\r\n' | nc -w 10 $1 $2 | sed '1,/^\r\$/d' | md5sum | cut -d' ' -f1"; }
# make_big CTR: 16 MiB of random bytes as /big in the container's web root;
# prints their MD5.
make_big() { in_pod "$1" "head -c $BIG /dev/urandom >/www/big && md5sum /www/big | cut -d' ' -f1"; }

# watchers: the PIDs of our runsc shared memory link watchers.
watchers() {
	local p
	for p in $(our_pids); do
		tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q ' sharedmem-reattach --watch ' && printf '%s ' "$p"
	done
	return 0
}
no_watchers() { [ -z "$(watchers)" ]; }
# start_echo CTR PORT: an echo server for one connection in the container.
start_echo() { in_pod "$1" "setsid nc -l -p $2 -e cat </dev/null >/dev/null 2>&1 &"; }
# start_busy CTR ADDR PORT: a client in the container sending a numbered
# line every 50 ms over one connection to ADDR:PORT until /tmp/busy.stop
# exists, then "end"; each echo is written to /tmp/busy.out with the
# container's uptime (0.01 s) when it came back, the number of lines sent
# to /tmp/busy.sent.
start_busy() {
	in_pod "$1" "rm -f /tmp/busy.*; setsid sh -c '(i=0; while [ ! -e /tmp/busy.stop ]; do echo \$i; i=\$((i + 1)); sleep 0.05; done; echo \$i >/tmp/busy.sent; echo end; sleep 30) | nc $2 $3 | while read -r l; do read -r up _ </proc/uptime; echo \"\$l \$up\"; [ \"\$l\" = end ] && break; done >/tmp/busy.out' </dev/null >/dev/null 2>&1 &"
}
# busy_lines CTR: echoes the busy client got back so far.
busy_lines() { in_pod "$1" 'wc -l </tmp/busy.out 2>/dev/null || echo 0' | tr -d ' '; }
# settle_lines CTR N: the busy client got N echoes within 300 polls half a
# second apart (150 s of sleeps, more with the execs): longer than TCP's
# longest retransmission backoff (gVisor's is 120 s), so that a slow
# recovery shows as a long pause in the log rather than a failure.
settle_lines() {
	local i
	for i in $(seq 300); do
		[ "$(busy_lines "$1")" -ge "$2" ] && return 0
		sleep 0.5
	done
	return 1
}
# settle_done CTR: the busy client got its "end" back within 300 polls.
settle_done() {
	local i
	for i in $(seq 300); do
		in_pod "$1" 'grep -q "^end " /tmp/busy.out' 2>/dev/null && return 0
		sleep 0.5
	done
	return 1
}
# settle_link_up POD: the agent sees POD's shm link up within 30 s.
settle_link_up() {
	local i
	for i in $(seq 300); do
		[ "$(link_metric shm_cni_link_up "$1")" = 1 ] && return 0
		sleep 0.1
	done
	return 1
}

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
shm_handler
say "containerd $("$CTRD2/containerd" --version | awk '{print $3}'), runsc $(cat "$CRI_BIN/runsc.version")"
start_containerd "$CTRD2/containerd" "$CTRD2/ctr"

say "a runc pod, two runsc pods on TAP, two runsc pods on shared memory"
run_server_pod k
run_server_pod g1 runsc
run_server_pod g2 runsc
run_server_pod s1 "$SHM_HANDLER"
run_server_pod s2 "$SHM_HANDLER"
for p in k g1 g2 s1 s2; do wait_serving "${CTR[$p]}"; done
say "runc pod k ${IP[k]}, runsc pods g1 ${IP[g1]}, g2 ${IP[g2]}, runsc-shm pods s1 ${IP[s1]}, s2 ${IP[s2]}, host $GATEWAY"

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

say "runsc pods on shared memory"
check "pod s1 runs in gVisor (its kernel log)" 1 "$(in_pod "${CTR[s1]}" 'dmesg' | grep -c 'Starting gVisor')"
check "pod s1: gVisor's eth0 carries the CRI address" "${IP[s1]}/32" "$(in_pod "${CTR[s1]}" "ip -4 -o addr show dev eth0 | awk '{print \$4}'")"
check "pod s1: gVisor's eth0 at the sandbox links' MTU (the agent's --shm-mtu default)" 65000 \
	"$(in_pod "${CTR[s1]}" "ip -o link show dev eth0 | grep -o 'mtu [0-9]*' | cut -d' ' -f2")"
snetns=$(netns_of "${POD[s1]}")
gnetns=$(netns_of "${POD[g1]}")
if [ -n "$snetns" ] && [ -e "$snetns" ] && [ -n "$gnetns" ] && [ -e "$gnetns" ]; then
	check "pod s1: its netns' eth0 (the placeholder) is marked with the agent's attach socket" "alias sharedmem:$S/sb/${POD[s1]}-eth0.sock" \
		"$(nsenter --net="$snetns" ip -o link show dev eth0 | grep -o 'alias .*')"
	check "pod s1: runsc took the address off the placeholder" "" "$(nsenter --net="$snetns" ip -4 -o addr show dev eth0)"
	check "pod s1: no AF_PACKET socket in its netns" 0 "$(packet_sockets "$snetns")"
	check "pod g1 (TAP): its netns holds runsc's AF_PACKET socket, for contrast" 1 "$(packet_sockets "$gnetns")"
	sentry=$(sentry_of "$snetns")
	check "pod s1: one Sentry (runsc boot) in its netns" 1 "$(echo "$sentry" | grep -c .)"
	check "pod s1: the Sentry maps the queue pair's 8 regions" 8 \
		"$(grep -o 'memfd:shm-cni-[a-z]*-[a-z]*' "/proc/${sentry:-0}/maps" 2>/dev/null | sort -u | wc -l)"
else
	fail "pods s1, g1: no netns path from CRI (${snetns:-none}, ${gnetns:-none})"
fi
check "agent: s1's shm link is up (its sandbox connected)" 1 "$(link_metric shm_cni_link_up s1)"
check "agent: s2's shm link is up" 1 "$(link_metric shm_cni_link_up s2)"

check "runsc-shm s1 -> runc k TCP, k sees s1's address" "${IP[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP[k]}" 8080)")"
check "runc k -> runsc-shm s1 TCP, s1 sees k's address" "${IP[k]}" "$(in_pod "${CTR[k]}" "$(peer_cmd "${IP[s1]}" 8080)")"
check "runsc-shm s1 -> runsc g1 (TAP) TCP, g1 sees s1's address" "${IP[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP[g1]}" 8080)")"
check "runsc g1 (TAP) -> runsc-shm s1 TCP, s1 sees g1's address" "${IP[g1]}" "$(in_pod "${CTR[g1]}" "$(peer_cmd "${IP[s1]}" 8080)")"
check "runsc-shm s1 -> runsc-shm s2 TCP, s2 sees s1's address" "${IP[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP[s2]}" 8080)")"
check "runsc-shm s2 <- runsc-shm s1 4 MiB, MD5" "$(in_pod "${CTR[s1]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[s2]}" "$(blob_cmd "${IP[s1]}")")"
check "host -> runsc-shm s1 TCP, s1 sees the host's uplink address" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[s1]}" 8080)")"
check "runsc-shm s1 -> host TCP, the host sees s1's address" "${IP[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "$GATEWAY" "$HOST_PORT")")"
check "runsc-shm s1 -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[s1]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"

say "IPv6: runsc-shm s1 ${IP6[s1]}, s2 ${IP6[s2]}, runc k ${IP6[k]}, runsc g1 ${IP6[g1]}"
for p in k g1 s1 s2; do
	in_cidr6=$(awk -v ip="${IP6[$p]}" -v net="${POD_CIDR6%%::*}:" 'BEGIN {print (ip != "" && index(ip, net) == 1) ? "yes" : "no"}')
	check "pod $p: an IPv6 address from $POD_CIDR6 (CRI: ${IP6[$p]:-none})" yes "$in_cidr6"
done
check "pod s1: gVisor's eth0 carries the CRI IPv6 address" "${IP6[s1]}/128" \
	"$(in_pod "${CTR[s1]}" "ip -6 -o addr show dev eth0 scope global | awk '{print \$4}'")"
check "IPv6 runsc-shm s1 -> runsc-shm s2 TCP, s2 sees s1's address" "${IP6[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP6[s2]}" 8080)")"
check "IPv6 runsc-shm s2 -> runsc-shm s1 TCP, s1 sees s2's address" "${IP6[s2]}" "$(in_pod "${CTR[s2]}" "$(peer_cmd "${IP6[s1]}" 8080)")"
check "IPv6 runsc-shm s1 -> runc k TCP, k sees s1's address" "${IP6[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP6[k]}" 8080)")"
check "IPv6 runc k -> runsc-shm s1 TCP, s1 sees k's address" "${IP6[k]}" "$(in_pod "${CTR[k]}" "$(peer_cmd "${IP6[s1]}" 8080)")"
check "IPv6 runsc g1 (TAP) -> runsc-shm s1 TCP, s1 sees g1's address" "${IP6[g1]}" "$(in_pod "${CTR[g1]}" "$(peer_cmd "${IP6[s1]}" 8080)")"
check "IPv6 runsc-shm s2 <- runsc-shm s1 4 MiB, MD5" "$(in_pod "${CTR[s1]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[s2]}" "$(blob_cmd "${IP6[s1]}")")"
check "IPv6 runc k <- runsc-shm s1 4 MiB, MD5" "$(in_pod "${CTR[s1]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[k]}" "$(blob_cmd "${IP6[s1]}")")"
check "IPv6 host <- runsc-shm s1 4 MiB, MD5" "$(in_pod "${CTR[s1]}" 'cat /www/blob.md5')" "$(/bin/busybox sh -c "$(blob_cmd "${IP6[s1]}")")"

rx0=$(link_metric shm_cni_link_receive_bytes_total s1)
tx0=$(link_metric shm_cni_link_transmit_bytes_total s1)
big_s1=$(make_big "${CTR[s1]}")
for p in k g1 s2; do
	big=$(make_big "${CTR[$p]}")
	txframes0=$(link_metric shm_cni_link_transmit_packets_total s1)
	txbytes0=$(link_metric shm_cni_link_transmit_bytes_total s1)
	check "runsc-shm s1 <- $p 16 MiB, MD5" "$big" "$(in_pod "${CTR[s1]}" "$(big_cmd "${IP[$p]}" 8080)")"
	if [ "$p" = k ]; then
		frames=$(($(link_metric shm_cni_link_transmit_packets_total s1) - txframes0))
		bytes=$(($(link_metric shm_cni_link_transmit_bytes_total s1) - txbytes0))
		say "s1's shm link while runc k sent s1 16 MiB (MSS 1460): $frames frames, $bytes bytes"
		# k's kernel hands the agent TCP super-packets with partial
		# checksums; they reach the Sentry whole only if it took them
		# (rxGSO, patches 0015 and 0016 of hack/runsc), else cut into
		# frames of at most 1514 bytes.
		check "agent: runc k's frames to s1 are larger than one segment on average (the kernel's super-packets, whole)" 1 "$((frames > 0 && bytes > 1514 * frames))"
	fi
	frames0=$(link_metric shm_cni_link_receive_packets_total s1)
	bytes0=$(link_metric shm_cni_link_receive_bytes_total s1)
	check "$p <- runsc-shm s1 16 MiB, MD5" "$big_s1" "$(in_pod "${CTR[$p]}" "$(big_cmd "${IP[s1]}" 8080)")"
	if [ "$p" = k ]; then
		frames=$(($(link_metric shm_cni_link_receive_packets_total s1) - frames0))
		bytes=$(($(link_metric shm_cni_link_receive_bytes_total s1) - bytes0))
		say "s1's shm link while s1 sent 16 MiB to runc k (MSS 1460): $frames frames, $bytes bytes"
		# k's MSS cuts s1's stream into frames of at most 1514 bytes,
		# unless the Sentry hands the agent TCP super-packets (txGSO,
		# patches 0010 and 0011 of hack/runsc).
		check "agent: s1's frames to runc k are larger than one segment on average (the Sentry's TCP super-packets)" 1 "$((frames > 0 && bytes > 1514 * frames))"
	fi
done
check "host <- runsc-shm s1 16 MiB, MD5" "$big_s1" "$(/bin/busybox sh -c "$(big_cmd "${IP[s1]}" 8080)")"
head -c "$BIG" /dev/urandom >"$S/www-host/big"
check "runsc-shm s1 <- host 16 MiB, MD5" "$(md5sum <"$S/www-host/big" | cut -d' ' -f1)" "$(in_pod "${CTR[s1]}" "$(big_cmd "$GATEWAY" "$HOST_PORT")")"
rx=$(($(link_metric shm_cni_link_receive_bytes_total s1) - rx0))
tx=$(($(link_metric shm_cni_link_transmit_bytes_total s1) - tx0))
say "s1's shm link during the 16 MiB transfers: the agent received $rx bytes, transmitted $tx"
check "agent: s1's shm link received at least the 4 x 16 MiB s1 sent" 1 "$((rx >= 4 * BIG))"
check "agent: s1's shm link transmitted at least the 4 x 16 MiB s1 got" 1 "$((tx >= 4 * BIG))"
check "agent: no protocol violation on the shm links" 0 "$(($(link_metric shm_cni_link_protocol_violations_total s1) + $(link_metric shm_cni_link_protocol_violations_total s2)))"

say "agent restarts under live TCP (SIGTERM, then SIGKILL)"
check "runsc: one shared memory link watcher per runsc-shm pod" 2 "$(watchers | wc -w)"
# Busy connections: s1 -> s2 (both runsc-shm) and k (runc) -> s1, each a
# loop of small request/responses over one connection, on through both
# restarts.
start_echo "${CTR[s2]}" 9001
start_echo "${CTR[s1]}" 9002
start_busy "${CTR[s1]}" "${IP[s2]}" 9001
start_busy "${CTR[k]}" "${IP[s1]}" 9002
for c in s1 k; do
	settle_lines "${CTR[$c]}" 20 || fail "busy connection from $c: no echo before the restarts"
done
declare -A MARK
for sig in TERM KILL; do
	for c in s1 k; do MARK[$c-$sig]=$(busy_lines "${CTR[$c]}"); done
	restart_agent "$sig"
	say "agent restarted after SIG$sig (PID $(pid_of agent))"
	for p in s1 s2; do
		settle_link_up "$p" || true
		check "after SIG$sig: $p's shm link up again (runsc reattached it)" 1 "$(link_metric shm_cni_link_up "$p")"
	done
	for c in s1 k; do
		want=$((MARK[$c-$sig] + 40))
		settle_lines "${CTR[$c]}" "$want" || true
		check "after SIG$sig: the busy connection from $c carries on (40 more echoes)" 1 "$(($(busy_lines "${CTR[$c]}") >= want))"
	done
	check "after SIG$sig: runsc-shm s1 -> runsc-shm s2 new TCP, s2 sees s1's address" "${IP[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP[s2]}" 8080)")"
	check "after SIG$sig: runc k -> runsc-shm s1 new TCP, s1 sees k's address" "${IP[k]}" "$(in_pod "${CTR[k]}" "$(peer_cmd "${IP[s1]}" 8080)")"
	check "after SIG$sig: runsc-shm s1 -> runc k new TCP, k sees s1's address" "${IP[s1]}" "$(in_pod "${CTR[s1]}" "$(peer_cmd "${IP[k]}" 8080)")"
done
for c in s1 k; do in_pod "${CTR[$c]}" 'touch /tmp/busy.stop'; done
for c in s1 k; do
	settle_done "${CTR[$c]}" || true
	out=$(in_pod "${CTR[$c]}" 'cat /tmp/busy.out')
	echo "$out" >"$S/logs/busy-$c.out" # each echo with the pod's uptime
	sent=$(in_pod "${CTR[$c]}" 'cat /tmp/busy.sent')
	# Every line back, in order, and the end.
	check "busy connection from $c: every one of its $sent requests echoed, in order, through both restarts" "$sent end" \
		"$(echo "$out" | awk '$1 == "end" {print n, "end"; exit} $1 != n {print "line", NR, "is", $1; exit} {n++}')"
	for sig in TERM KILL; do
		from=${MARK[$c-$sig]}
		to=$(echo "$out" | wc -l)
		[ "$sig" = TERM ] && to=${MARK[$c-KILL]}
		say "busy connection from $c: longest pause around the SIG$sig restart: $(echo "$out" | awk -v a="$from" -v b="$to" \
			'NR > a && NR <= b + 1 && NR > 1 && $2 - t > m {m = $2 - t} {t = $2} END {printf "%.2f s", m}')"
	done
done
check "runsc-shm s2 <- runsc-shm s1 4 MiB after the restarts, MD5" "$(in_pod "${CTR[s1]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[s2]}" "$(blob_cmd "${IP[s1]}")")"
check "agent: no protocol violation on the shm links after the restarts" 0 "$(($(link_metric shm_cni_link_protocol_violations_total s1) + $(link_metric shm_cni_link_protocol_violations_total s2)))"

say "remove the pods"
agent_baseline "the pods"
settle no_watchers || true
check "runsc: no shared memory link watcher left" "" "$(watchers)"

say "$CHURN runsc pods and $CHURN runsc-shm pods"
for i in $(seq "$CHURN"); do
	for h in runsc "$SHM_HANDLER"; do
		pod_json "churn-$h-$i"
		crictl_ runp --runtime "$h" "$S/pods/churn-$h-$i.json" >/dev/null 2>>"$S/logs/churn.log" || true
	done
done
check "CRI: runsc and runsc-shm pods ready" "$((2 * CHURN))" "$(crictl_ pods -q --state ready | wc -l)"
check "agent: attachments" "$((2 * CHURN))" "$(attachments_count)"
check "agent: shm links up (their sandboxes connected)" "$CHURN" \
	"$(http_get "$METRICS_ADDR" /metrics | awk 'index($0, "shm_cni_link_up{") == 1 && /kind="shm"/ {s += $NF} END {printf "%d", s}')"
remove_pods
check_nothing_left
# runsc keeps one "null-netns" mount in its root for all sandboxes.
check "runsc: no sandbox left in its root" "" "$(find "$S/runsc/root" -mindepth 2 ! -name null-netns ! -name "*.lock" -printf "%f ")"

say "teardown"
teardown_and_verify
finish "tier 2 (containerd v2, runsc, shm-cni)"
