#!/usr/bin/env bash
# bench-runsc.sh (make bench-runsc): what a gVisor user gets from each
# network, measured in one run with real runtimes: containerd v2 with runsc
# (gVisor) and runc pods, all running the same static traffic tool
# (test/e2e/cri/nettool), over
#
#   tap     shm-cni, every pod on a TAP link (runsc's Sentry on AF_PACKET)
#   bridge  the reference bridge plugin (veth pairs on a Linux bridge):
#           what runsc users run today, and runc on it is the kernel
#           reference every row is compared with
#   shm     shm-cni, runsc pods on shared-memory links (the runtime handler
#           runsc-shm: runsc with --sharedmem-links and a conflist of kind
#           shm, the README's recipe), runc pods on TAP
#
# For each network and each pair (runsc -> runsc, runc -> runc, runsc ->
# runc, runc -> runsc): TCP throughput with 1 and 4 streams, the machine's
# busy CPU seconds per GiB moved (agent, sandboxes, kernel and whatever
# else runs: keep the machine otherwise idle), and 64-byte request/response
# round trips (p50, p99); REPS runs each, medians, ratios to runc -> runc
# over bridge. The sink counts bytes without checking them (the tiers check
# data with MD5): the benchmark measures the path.
#
# Writes bin/bench-runsc.md (with the machine and its load before and
# after) and bin/bench-runsc.raw. Never part of make test. Needs root and
# the runsc tier's builds (hack/cri-deps.sh runsc, done here).
set -euo pipefail
# shellcheck source=test/e2e/cri/lib.sh
. "$(dirname "$0")/lib.sh"

NETWORKS=${NETWORKS:-shm tap bridge}
REPS=${REPS:-3}
TIME=${TIME:-3s}
RTT_COUNT=${RTT_COUNT:-5000}
# The firewall is not what is measured.
HOST_FORWARD=keep
BRIDGE=cnibench0
BRIDGE_CIDR=${BRIDGE_CIDR:-10.214.0.0/24}
IMAGE_NETTOOL=shm-cni.test/nettool:bench
CTRD2=$CRI_BIN/containerd2
OUT=$REPO/bin

need_root
lock
sweep_stale
trap on_exit EXIT
trap 'exit 130' INT TERM

# pre_teardown: the bridge the bridge plugin made (teardown's pod removal
# deletes the veths, not the bridge).
pre_teardown() {
	if [ -S "$S/containerd/containerd.sock" ] && ours "$(pid_of containerd)"; then
		remove_pods
	fi
	ip link del "$BRIDGE" 2>/dev/null || true
}

say "deps (runsc, containerd v2: built once)"
"$REPO/hack/cri-deps.sh" runsc
setup_scratch
say "build ($S)"
build
(cd "$REPO" && CGO_ENABLED=0 go build -ldflags '-s -w' -o "$S/bin/" ./test/e2e/cri/nettool) || die "build nettool"
"$S/bin/mkimage" -ref "$IMAGE_NETTOOL" -o "$S/images/nettool.tar" -entrypoint "/nettool serve" "$S/bin/nettool:/nettool" >/dev/null ||
	die "nettool image"
ln -sf /usr/lib/cni/bridge "$S/cni/bin/bridge"
ln -sf /usr/lib/cni/host-local "$S/cni/bin/host-local"
routed "$BRIDGE_CIDR" && die "$BRIDGE_CIDR is routed on this machine already; set BRIDGE_CIDR"
setup_outside
start_agent
write_conflist 1.1.0 # the crictl config, and the runsc-shm handler's conflist
# RUNSC_PROFILE=1: runsc --profile, for runsc debug --profile-cpu (README).
write_runsc_config "" "${RUNSC_PROFILE:+  profile = \"true\"}"
write_containerd_config 2 true
shm_handler

# conflist NETWORK: the network's conflist, alone in the CNI config dir.
# SHM_CNI_CONF (optional) adds fields to shm-cni's plugin config:
# SHM_CNI_CONF='"queue": {"dataSize": 8388608}'.
conflist() {
	rm -f "$S"/cni/net.d/*
	case $1 in
	tap | shm)
		cat >"$S/cni/net.d/10-bench.conflist" <<EOF
{"cniVersion": "1.1.0", "name": "$CNI_NETWORK", "plugins": [{
  "type": "shm-cni", "kind": "tap", "mtu": 1500, "agentSocket": "$S/agent.sock",
  "logFile": "$S/logs/shm-cni.log", "logLevel": "info"${SHM_CNI_CONF:+, $SHM_CNI_CONF}}]}
EOF
		;;
	bridge)
		# Debian's reference plugins speak CNI up to 1.0.0.
		cat >"$S/cni/net.d/10-bench.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "$CNI_NETWORK", "plugins": [{
  "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "mtu": 1500,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "$BRIDGE_CIDR"}]], "dataDir": "$S/cni/ipam"}}]}
EOF
		;;
	*) die "unknown network $1: want tap, bridge or shm" ;;
	esac
}

# tool_pod NAME HANDLER NETWORK: a pod running nettool serve; on the shm
# network a runsc pod runs with the runsc-shm handler (a shared-memory
# link).
tool_pod() {
	local name=$1 handler=$2 network=$3 p c
	[ "$network" = shm ] && [ "$handler" = runsc ] && handler=$SHM_HANDLER
	mkdir -p "$S/logs/pods/$name"
	cat >"$S/pods/$name.json" <<EOF
{"metadata": {"name": "$name", "namespace": "shm-bench", "uid": "uid-$name", "attempt": 0},
 "log_directory": "$S/logs/pods/$name", "linux": {}}
EOF
	cat >"$S/pods/$name-ctr.json" <<EOF
{"metadata": {"name": "nettool"}, "image": {"image": "$IMAGE_NETTOOL"}, "log_path": "nettool.log", "linux": {}}
EOF
	p=$(crictl_ runp --runtime "$handler" "$S/pods/$name.json" 2>>"$S/logs/crictl.log") || die "run pod $name"
	c=$(crictl_ create "$p" "$S/pods/$name-ctr.json" "$S/pods/$name.json" 2>>"$S/logs/crictl.log") || die "create the container of $name"
	crictl_ start "$c" >/dev/null || die "start the container of $name"
	POD[$name]=$p
	CTR[$name]=$c
	IP[$name]=$(crictl_ inspectp -o go-template --template '{{.status.network.ip}}' "$p") || die "inspect pod $name"
}

# tool CTR ARGS...: nettool in the container.
tool() {
	local c=$1
	shift
	crictl_ exec "$c" /nettool "$@"
}

# cpu_between START END: "cpu_s=" the busy CPU seconds of the machine
# between two unix nanosecond times, from the sampler's log (the samples
# around them); nothing without samples on both sides.
cpu_between() {
	awk -v s="$1" -v e="$2" -v hz="$(getconf CLK_TCK)" '
		$1 <= s { a = $2 }
		$1 >= e && b == "" { b = $2 }
		END { if (a != "" && b != "") printf "cpu_s=%.3f\n", (b - a) / hz }' "$S/logs/cpu.log"
}

# cpu_ticks PID...: the CPU time the processes have used, in clock ticks
# (user and system, all threads; a process gone counts nothing).
cpu_ticks() {
	local pid f sum=0
	for pid in "$@"; do
		read -ra f <<<"$(stat_fields "$pid")"
		[ "${#f[@]}" -ge 13 ] || continue
		# After the command name: state is the 1st field, utime the
		# 12th, stime the 13th.
		sum=$((sum + f[11] + f[12]))
	done
	echo "$sum"
}

# sentries: the PIDs of the runsc pods' Sentries (the sandbox processes,
# whose argv[0] runsc sets to runsc-sandbox).
sentries() { pgrep -f '^runsc-sandbox' || true; }

# measure NETWORK PAIR SRC DST: REPS of each measurement from SRC to DST.
# Beside the machine's CPU over the transfer, each run records the agent's
# and the runsc pods' Sentries' own CPU seconds (agent_s, sentry_s) over the
# whole crictl exec of the sender, its start in its pod included; the
# report takes them from the 1-stream runs.
measure() {
	local network=$1 pair=$2 src=${CTR[$3]} dst=${IP[$4]} rep streams line start end own a0 s0
	local hz agent
	hz=$(getconf CLK_TCK)
	agent=$(pid_of agent)
	for rep in $(seq "$REPS"); do
		for streams in 1 4; do
			# shellcheck disable=SC2046 # one PID per word
			a0=$(cpu_ticks "$agent") s0=$(cpu_ticks $(sentries))
			line=$(tool "$src" send -to "$dst" -streams "$streams" -time "$TIME") || die "$pair send: $line"
			# shellcheck disable=SC2046
			own=$(awk -v a="$(($(cpu_ticks "$agent") - a0))" -v s="$(($(cpu_ticks $(sentries)) - s0))" -v hz="$hz" \
				'BEGIN { printf "agent_s=%.2f sentry_s=%.2f", a / hz, s / hz }')
			start=$(fields "$line" start)
			end=$(fields "$line" end)
			sleep 0.1 # a CPU sample after the end
			echo "network=$network pair=$pair metric=tput streams=$streams $line $(cpu_between "$start" "$end") $own" >>"$S/raw"
		done
		line=$(tool "$src" rr -to "$dst" -count "$RTT_COUNT") || die "$pair rr: $line"
		echo "network=$network pair=$pair metric=rr $line" >>"$S/raw"
	done
	say "$network $pair: $(grep -c "network=$network pair=$pair " "$S/raw") measurements"
}

# fields LINE KEY: KEY's value in "k=v ..." LINE.
fields() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start_bg cpu "$S/bin/nettool" cpu -interval 50ms
: >"$S/raw"
for network in $NETWORKS; do
	say "network $network"
	conflist "$network"
	start_containerd "$CTRD2/containerd" "$CTRD2/ctr"
	"$CTRD2/ctr" -a "$S/containerd/containerd.sock" -n k8s.io images import "$S/images/nettool.tar" >/dev/null || die "import nettool"
	tool_pod g1 runsc "$network"
	tool_pod g2 runsc "$network"
	tool_pod k1 runc "$network"
	tool_pod k2 runc "$network"
	say "runsc g1 ${IP[g1]}, g2 ${IP[g2]}; runc k1 ${IP[k1]}, k2 ${IP[k2]}"
	sleep 1 # the servers listen
	measure "$network" runsc-runsc g1 g2
	measure "$network" runc-runc k1 k2
	measure "$network" runsc-runc g1 k1
	measure "$network" runc-runsc k1 g1
	remove_pods
	stop_pid "$(pid_of containerd)"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$OUT"
cp "$S/raw" "$OUT/bench-runsc.raw"
{
	echo "# runsc and runc pods over shm-cni and the bridge plugin"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown);" \
		"$(nproc) cores, kernel $(uname -r); load $load_before before, $load_after after;" \
		"$REPS runs of $TIME per throughput cell, $RTT_COUNT round trips per RTT cell; networks: $NETWORKS."
	echo "containerd $("$CTRD2/containerd" --version | awk '{print $3}'), runsc $(cat "$CRI_BIN/runsc.version"), platform systrap."
	echo
	"$S/bin/nettool" report -ref bridge/runc-runc <"$S/raw"
} >"$OUT/bench-runsc.md" || die "report"
cat "$OUT/bench-runsc.md"
