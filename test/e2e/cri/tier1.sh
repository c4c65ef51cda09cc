#!/usr/bin/env bash
# Tier 1 of the runtime tests (make e2e-cri): containerd 1.6 and runc from
# Debian, driven through CRI by crictl, pods networked by shm-cni (kind tap)
# and the real shm-agent in the host network namespace, as on a node.
#
# Checks, each printed as PASS or FAIL:
#   - a pod's eth0 is a TAP device carrying the address CRI reports, with
#     the default route via the link-local gateway; the agent lists it;
#   - pod <-> pod TCP both ways (the server sees the client's pod address)
#     and a 4 MiB transfer with matching MD5;
#   - host -> pod and pod -> host TCP, and the transfer host <- pod;
#   - a pod's bandwidth annotations reach the agent as its link's limit;
#   - pod -> an "outside" namespace beyond the host: the outside sees the
#     host's address (masquerade), and it has no route to the pods;
#   - a pod annotated shm-cni.io/kind=veth (containerd passes the pod's
#     annotations, the conflist declares the capability) on a veth link:
#     TCP with a TAP pod both ways, with the host both ways, to the outside
#     masqueraded, the host's kernel forwarding;
#   - 50 pods created (5 at a time, every other one on a veth link) all
#     answer the host's ping, then removed: no pod, netns mount, agent
#     attachment (/attachments and state), IPAM allocation, libcni cache
#     entry, TAP fd or veth link is left, and the agent's fds and goroutines
#     are back to their baseline.
# Exits non-zero on any failure. Needs root; installs what it needs
# (hack/cri-deps.sh). Everything it starts it stops (see lib.sh).
set -euo pipefail
# shellcheck source=test/e2e/cri/lib.sh
. "$(dirname "$0")/lib.sh"

CHURN=${CHURN:-50}
CHURN_PARALLEL=${CHURN_PARALLEL:-5}
HOST_PORT=18080

need_root
lock
sweep_stale
trap on_exit EXIT
trap 'exit 130' INT TERM

say "deps"
"$REPO/hack/cri-deps.sh"
setup_scratch
say "build ($S)"
build
say "outside namespace, agent"
setup_outside
start_agent
write_conflist 1.0.0
write_containerd_config 1 true
say "containerd $(containerd --version | awk '{print $3}')"
start_containerd "$(command -v containerd)" "$(command -v ctr)"

say "two runc pods"
run_server_pod a
run_server_pod b
wait_serving "${CTR[a]}"
wait_serving "${CTR[b]}"
say "pod a ${IP[a]}, pod b ${IP[b]}, host (uplink $UPLINK) $GATEWAY"

check "pod a: eth0 is a TAP device" yes "$(in_pod "${CTR[a]}" 'test -e /sys/class/net/eth0/tun_flags && echo yes')"
check "pod a: eth0 carries the CRI address" "${IP[a]}/32" "$(in_pod "${CTR[a]}" "ip -4 -o addr show dev eth0 | awk '{print \$4}'")"
check "pod a: default route via the link-local gateway" "default via 169.254.1.1 dev eth0" "$(in_pod "${CTR[a]}" 'ip -4 route show default' | awk '{print $1, $2, $3, $4, $5}')"
check "agent: attachments of the two pods" 2 "$(attachments_count)"
check "agent: lists pod a's address" 1 "$(http_get "$METRICS_ADDR" /attachments | grep -cF "\"${IP[a]}\"")"

check "pod a -> pod b TCP, b sees a's address" "${IP[a]}" "$(in_pod "${CTR[a]}" "$(peer_cmd "${IP[b]}" 8080)")"
check "pod b -> pod a TCP, a sees b's address" "${IP[b]}" "$(in_pod "${CTR[b]}" "$(peer_cmd "${IP[a]}" 8080)")"
check "pod a <- pod b 4 MiB, MD5" "$(in_pod "${CTR[b]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[a]}" "$(blob_cmd "${IP[b]}")")"
check "pod b <- pod a 4 MiB, MD5" "$(in_pod "${CTR[a]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[b]}" "$(blob_cmd "${IP[a]}")")"

check "host -> pod a TCP, a sees the host's uplink address" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[a]}" 8080)")"
check "host <- pod a 4 MiB, MD5" "$(in_pod "${CTR[a]}" 'cat /www/blob.md5')" "$(/bin/busybox sh -c "$(blob_cmd "${IP[a]}")")"
start_host_server host "" "$GATEWAY" "$HOST_PORT"
check "pod a -> host TCP, the host sees a's address" "${IP[a]}" "$(in_pod "${CTR[a]}" "$(peer_cmd "$GATEWAY" "$HOST_PORT")")"

start_host_server outside "$OUTSIDE_NS" "$OUTSIDE_PEER" 8080
check "outside: no route to the pods" "" "$(ip -n "$OUTSIDE_NS" -4 route show to match "${IP[a]}" | grep -v '^default' || true)"
check "pod a -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[a]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"
check "pod b -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[b]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"

# A kernel pod on a veth link, by its annotation: the host's kernel forwards
# its packets, to the TAP pods through the agent's uplink.
say "pod v, annotated shm-cni.io/kind=veth"
run_server_pod v "" '{"shm-cni.io/kind": "veth"}'
wait_serving "${CTR[v]}"
check "pod v: eth0's peer is a veth link's host side (shmv*)" shmv \
	"$(ip -o link show | awk -F': ' -v i="$(in_pod "${CTR[v]}" 'cat /sys/class/net/eth0/iflink')" '$1 == i {print substr($2, 1, 4)}')"
check "pod v: eth0 carries the CRI address" "${IP[v]}/32" "$(in_pod "${CTR[v]}" "ip -4 -o addr show dev eth0 | awk '{print \$4}'")"
check "agent: pod v's link is a veth link, up" 1 "$(http_get "$METRICS_ADDR" /metrics | awk '/^shm_cni_link_up\{/ && /pod="v"/ && /kind="veth"/ {print $NF}')"
check "host: a route to pod v through its link's host side" shmv "$(ip -4 route show "${IP[v]}" | awk '{print substr($3, 1, 4)}')"
check "pod a -> pod v TCP, v sees a's address" "${IP[a]}" "$(in_pod "${CTR[a]}" "$(peer_cmd "${IP[v]}" 8080)")"
check "pod v -> pod a TCP, a sees v's address" "${IP[v]}" "$(in_pod "${CTR[v]}" "$(peer_cmd "${IP[a]}" 8080)")"
check "pod v <- pod b 4 MiB, MD5" "$(in_pod "${CTR[b]}" 'cat /www/blob.md5')" "$(in_pod "${CTR[v]}" "$(blob_cmd "${IP[b]}")")"
check "host -> pod v TCP, v sees the host's address" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[v]}" 8080)")"
check "pod v -> host TCP, the host sees v's address" "${IP[v]}" "$(in_pod "${CTR[v]}" "$(peer_cmd "$GATEWAY" "$HOST_PORT")")"
check "pod v -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[v]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"

# What the churn below does to the agent (ICMP too) happens once before
# the baseline is read, so lazily started work is part of it.
check "host -> pods a, b, v: ping answered" "" "$(for ip in "${IP[a]}" "${IP[b]}" "${IP[v]}"; do /bin/busybox ping -c 1 -W 5 "$ip" >/dev/null 2>&1 || echo "$ip"; done)"

# Per-pod bandwidth from the pod's annotations: containerd reads them and
# passes the CNI bandwidth capability (the conflist declares it), with its
# own burst (2^32-1 bits); the agent limits the pod's link with them.
say "pod bw, annotated kubernetes.io/ingress-bandwidth 10M, egress-bandwidth 20M"
pod_json bw '{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"}'
crictl_ runp "$S/pods/bw.json" >/dev/null 2>>"$S/logs/crictl.log" || fail "run pod bw: $(tail -3 "$S/logs/shm-cni.log")"
check "agent: pod bw's link limited as annotated (bits per second, containerd's burst)" \
	'"bandwidth":{"ingressRate":10000000,"ingressBurst":4294967295,"egressRate":20000000,"egressBurst":4294967295}' \
	"$(http_get "$METRICS_ADDR" /attachments | tr -d ' \n' | grep -o '"bandwidth":{[^}]*}' || true)"

say "remove the four pods"
agent_baseline "the four pods"

say "$CHURN pods, $CHURN_PARALLEL at a time, every other one on a veth link"
churn_create() {
	local ann=
	[ $(($1 % 2)) -eq 0 ] && ann='{"shm-cni.io/kind": "veth"}'
	pod_json "churn-$1" "$ann"
	crictl_ runp "$S/pods/churn-$1.json" >"$S/pods/churn-$1.id" 2>>"$S/logs/churn.log" || true
}
t=$(date +%s%N)
for i in $(seq "$CHURN"); do
	churn_create "$i" &
	batch $! "$CHURN_PARALLEL"
done
batch_wait
say "created in $(since "$t")s"
check "CRI: pods running" "$CHURN" "$(crictl_ pods -q --state ready | wc -l)"
check "agent: attachments" "$CHURN" "$(attachments_count)"
http_get "$METRICS_ADDR" /attachments | grep -A1 '"addrs"' | grep -oE '"[0-9.]+"' | tr -d '"' | sort -u >"$S/churn-ips"
check "agent: distinct pod addresses" "$CHURN" "$(wc -l <"$S/churn-ips")"
check "agent: veth links among them" $((CHURN / 2)) "$(http_get "$METRICS_ADDR" /metrics | awk '/^shm_cni_link_up\{/ && /kind="veth"/ && $NF == 1' | wc -l)"
: >"$S/ping-failed"
while read -r ip; do
	{ /bin/busybox ping -c 1 -W 5 "$ip" >/dev/null 2>&1 || echo "$ip" >>"$S/ping-failed"; } &
	batch $! 10
done <"$S/churn-ips"
batch_wait
check "host -> every pod: ping answered" "" "$(tr '\n' ' ' <"$S/ping-failed")"

say "remove the $CHURN pods"
t=$(date +%s%N)
remove_pods
say "removed in $(since "$t")s"
check_nothing_left
check "libcni: no cached result of $CNI_NETWORK left" 0 "$(cni_cache_entries)"
if [ "$LAST_GR" -le "$BASE_GR" ]; then
	pass "agent: goroutines back to the baseline ($LAST_GR <= $BASE_GR)"
else
	fail "agent: $LAST_GR goroutines, baseline $BASE_GR"
fi

say "teardown"
teardown_and_verify
finish "tier 1 (containerd $(containerd --version | awk '{print $3}'), runc, shm-cni)"
