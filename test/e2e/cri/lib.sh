# shellcheck shell=bash
# lib.sh is sourced by the runtime tiers (tier1.sh, tier2-runsc.sh): a node
# made of the real shm-agent in the host network namespace and a private
# containerd driven through CRI (crictl), pods networked by shm-cni.
#
# Everything a tier makes lives under one scratch directory (containerd's
# root, state and socket, runc's root, the agent's socket and state, CNI
# config, logs) or carries a fixed name below (the outside netns and veth, the
# uplink), and teardown removes it, on success, failure or interrupt. Runs
# are serialised by a lock; a run finds and removes what a killed run left.
# Processes are stopped by PID, and only those whose command line names the
# run's scratch directory: no other containerd or netns is touched.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
CRI_BIN=$REPO/bin/cri

# The node's addressing and names. The pod CIDR and the outside link must
# not overlap anything routed on the machine (checked).
POD_CIDR=${POD_CIDR:-10.213.0.0/24}
# POD_CIDR6, when a tier sets it, makes the node dual-stack.
POD_CIDR6=${POD_CIDR6:-}
OUTSIDE_HOST=${OUTSIDE_HOST:-198.51.100.1}
OUTSIDE_PEER=${OUTSIDE_PEER:-198.51.100.2}
UPLINK=shmcri0
OUTSIDE_NS=shmcri-outside
OUTSIDE_VETH=shmcri-out
METRICS_ADDR=${METRICS_ADDR:-127.0.0.1:19309}
CNI_NETWORK=shm-cri-e2e
# SHM_HANDLER is the runtime handler of runsc pods on shared-memory links
# (shm_handler).
SHM_HANDLER=runsc-shm
# HOST_FORWARD=drop (the default) sets the host's iptables FORWARD policy to
# DROP for the run, as Docker and hardened hosts leave it, so that every
# check passes through the agent's own accepts; teardown puts the policy back
# and checks the host's firewall is as it was. HOST_FORWARD=keep leaves it.
HOST_FORWARD=${HOST_FORWARD:-drop}
# FW_CHAIN is the agent's iptables chain (pkg/router/hostfw_linux.go).
FW_CHAIN=SHM-CNI-FORWARD
IMAGE_PAUSE=shm-cni.test/pause:e2e
IMAGE_BUSYBOX=shm-cni.test/busybox:e2e
# The lock serialising runs, and the record of the running one's scratch
# directory (for the next run to sweep when this one was killed).
LOCK_FILE=/run/shm-cni-cri.lock
RUN_RECORD=/run/shm-cni-cri.scratch

FAILS=0
CHECKS=0
T0=$(date +%s%N)

# since T: seconds since T (date +%s%N), one decimal.
since() {
	local ms=$((($(date +%s%N) - $1) / 1000000))
	printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}
elapsed() { printf '%6ss' "$(since "$T0")"; }
say() { echo "[$(elapsed)] $*"; }
pass() {
	CHECKS=$((CHECKS + 1))
	echo "PASS: $*"
}
fail() {
	CHECKS=$((CHECKS + 1))
	FAILS=$((FAILS + 1))
	echo "FAIL: $*"
}
die() {
	echo "FAIL: $*" >&2
	exit 1
}
# check NAME WANT GOT
check() {
	if [ "$2" = "$3" ]; then pass "$1 ($3)"; else fail "$1: want $2, got ${3:-nothing}"; fi
}

need_root() {
	[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, containerd, TAP devices)"
}

# lock takes the run lock, waiting for another run to end.
lock() {
	exec {LOCK_FD}>"$LOCK_FILE"
	if ! flock -n "$LOCK_FD"; then
		say "waiting for another runtime tier run to end"
		flock -w 1800 "$LOCK_FD" || die "another runtime tier run holds $LOCK_FILE"
	fi
}

# ours PID: the process's command line names the scratch directory $S
# (read without forking: teardown asks this of every process).
ours() {
	local args=()
	[ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
	mapfile -d '' args <"/proc/$1/cmdline" 2>/dev/null || return 1
	[[ "${args[*]}" == *"$S/"* ]]
}

# stop_pid PID: SIGTERM, up to 15 s, then SIGKILL; only a process of ours.
stop_pid() {
	local pid=$1 i
	ours "$pid" || return 0
	kill -TERM "$pid" 2>/dev/null || return 0
	for i in $(seq 150); do
		ours "$pid" || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
}

# our_pids: every process whose command line names $S (shims included).
our_pids() {
	local p
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		ours "$p" && echo "$p"
	done
	return 0
}

# start_bg NAME CMD...: runs CMD in the background, its output in
# $S/logs/NAME.log, its PID in $S/pids/NAME.
start_bg() {
	local name=$1
	shift
	# Without the lock's fd: a process that outlives a killed run must not
	# hold the lock the next run needs to sweep it.
	"$@" >"$S/logs/$name.log" 2>&1 {LOCK_FD}>&- &
	echo $! >"$S/pids/$name"
	started_at $! >"$S/pids/$name.start"
}

pid_of() { cat "$S/pids/$1" 2>/dev/null; }

# stat_fields PID: the fields of /proc/PID/stat after the command name
# (which may hold spaces): the state first, the start time (clock ticks
# since boot) 20th; empty when there is no such process.
stat_fields() {
	local stat
	read -r stat 2>/dev/null <"/proc/$1/stat" || return 0
	echo "${stat##*) }"
}

# started_at PID: the process's start time, empty without the process.
started_at() {
	# shellcheck disable=SC2046 # the fields, split
	set -- $(stat_fields "$1")
	echo "${20:-}"
}

# alive NAME: the process start_bg started as NAME runs (not yet exec'd
# counts: ours would not know it yet). Its start time tells it from a
# process that got its PID after it ended: on a busy machine PIDs wrap
# around within minutes.
alive() {
	local p
	p=$(pid_of "$1") || return 1
	# shellcheck disable=SC2046 # the fields, split
	set -- "$1" $(stat_fields "$p")
	[ -n "${2:-}" ] && [ "$2" != Z ] && [ "${21:-}" = "$(cat "$S/pids/$1.start" 2>/dev/null)" ]
}

# http_get HOST:PORT PATH: the body of a GET (bash's /dev/tcp, no client
# needed), empty on failure.
http_get() {
	local hp=$1 path=$2 fd
	exec {fd}<>"/dev/tcp/${hp%:*}/${hp##*:}" 2>/dev/null || return 1
	printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hp" >&"$fd"
	sed '1,/^\r$/d' <&"$fd"
	exec {fd}>&-
}

# Debian's and our builds of the tools.
CRICTL=$CRI_BIN/crictl
crictl_() { "$CRICTL" --config "$S/crictl.yaml" "$@"; }

# setup_scratch makes the run's scratch directory. It lives in /tmp, not
# under bin/, because the agent's per-link socket paths must fit sun_path.
setup_scratch() {
	S=$(mktemp -d /tmp/shmcri.XXXXXX)
	echo "$S" >>"$RUN_RECORD"
	mkdir -p "$S"/{bin,pids,logs,images,state,sb,cni/bin,cni/net.d,containerd,runc,pods}
	[ -d /run/containerd ] || touch "$S/made-run-containerd"
	[ -d /var/lib/cni ] || touch "$S/made-var-lib-cni"
}

# build: the project's binaries (bin/), then the pause program and the
# image tool into the scratch directory, and the two images.
build() {
	(cd "$REPO" && go build -o bin/ ./cmd/shm-cni ./cmd/shm-agent) || die "build shm-cni, shm-agent"
	(cd "$REPO" && CGO_ENABLED=0 go build -ldflags '-s -w' -o "$S/bin/" ./test/e2e/cri/pause ./test/e2e/cri/mkimage) ||
		die "build pause, mkimage"
	"$S/bin/mkimage" -ref "$IMAGE_PAUSE" -o "$S/images/pause.tar" -entrypoint /pause "$S/bin/pause:/pause" >/dev/null ||
		die "pause image"
	local links=() a
	for a in $(/bin/busybox --list); do
		[ "$a" = busybox ] || links+=(-symlink "/bin/$a=busybox")
	done
	"$S/bin/mkimage" -ref "$IMAGE_BUSYBOX" -o "$S/images/busybox.tar" -cmd /e2e/serve "${links[@]}" \
		/bin/busybox:/bin/busybox "$REPO/test/e2e/cri/image/serve:/e2e/serve" "$REPO/test/e2e/cri/image/peer:/e2e/peer" >/dev/null ||
		die "busybox image"
	ln -sf "$REPO/bin/shm-cni" "$S/cni/bin/shm-cni"
	ln -sf /usr/lib/cni/loopback "$S/cni/bin/loopback"
}

# routed CIDR: the machine has a route (other than a default) into CIDR.
routed() { ip route show to match "$1" | grep -qv '^default'; }

# setup_outside: the "outside" namespace beyond the host, on a veth from the
# host namespace. It has no route to the pods: only masquerade reaches it.
setup_outside() {
	routed "$POD_CIDR" && die "the pod CIDR $POD_CIDR is routed on this machine already; set POD_CIDR"
	[ -n "$POD_CIDR6" ] && routed "$POD_CIDR6" && die "the pod CIDR $POD_CIDR6 is routed on this machine already; set POD_CIDR6"
	routed "${OUTSIDE_HOST%.*}.0/24" && die "$OUTSIDE_HOST/24 is routed on this machine already; set OUTSIDE_HOST, OUTSIDE_PEER"
	ip netns add "$OUTSIDE_NS" || die "netns $OUTSIDE_NS"
	echo "$OUTSIDE_NS" >"$S/netns"
	ip link add "$OUTSIDE_VETH" type veth peer name eth0 netns "$OUTSIDE_NS" || die "veth $OUTSIDE_VETH"
	ip addr add "$OUTSIDE_HOST/24" dev "$OUTSIDE_VETH"
	ip link set "$OUTSIDE_VETH" up
	ip -n "$OUTSIDE_NS" addr add "$OUTSIDE_PEER/24" dev eth0
	ip -n "$OUTSIDE_NS" link set eth0 up
	ip -n "$OUTSIDE_NS" link set lo up
}

# forward_on IF...: IPv4 forwarding on for packets arriving on each IF.
forward_on() {
	local i
	for i in "$@"; do
		echo 1 >"/proc/sys/net/ipv4/conf/$i/forwarding" || return 1
	done
}

# firewall_snapshot: the host's iptables and nftables rules, without counters.
firewall_snapshot() {
	{
		iptables-save
		ip6tables-save
		nft list ruleset
	} 2>/dev/null | sed -E '/^#/d; s/ \[[0-9]+:[0-9]+\]$//; s/counter packets [0-9]+ bytes [0-9]+/counter/'
}

# forward_drop: with HOST_FORWARD=drop, the host's FORWARD policy (IPv4 and
# IPv6) DROP for the run; forward_restore puts back what it was, recorded
# under $S (so that a killed run's sweep restores it too).
forward_drop() {
	[ "$HOST_FORWARD" = drop ] || return 0
	command -v iptables >/dev/null || die "HOST_FORWARD=drop needs iptables (apt-get install iptables)"
	firewall_snapshot >"$S/firewall.before"
	local cmd fam
	for cmd in iptables ip6tables; do
		fam=ip
		[ "$cmd" = ip6tables ] && fam=ip6
		if "$cmd" -V | grep -q nf_tables && ! nft list table "$fam" filter >/dev/null 2>&1; then
			echo none >"$S/forward-policy.$cmd" # no filter table yet
		else
			"$cmd-save" -t filter | awk '$1 == ":FORWARD" {print $2}' >"$S/forward-policy.$cmd"
		fi
		"$cmd" -P FORWARD DROP || die "$cmd -P FORWARD DROP"
	done
	say "host FORWARD policy DROP for the run (was $(cat "$S/forward-policy.iptables"), IPv6 $(cat "$S/forward-policy.ip6tables"))"
}

# forward_restore: the FORWARD policies forward_drop found; a filter table
# the run made (iptables-nft) goes when nothing but its empty built-in chains
# is left in it.
forward_restore() {
	local cmd was fam
	for cmd in iptables ip6tables; do
		[ -f "$S/forward-policy.$cmd" ] || continue
		was=$(cat "$S/forward-policy.$cmd")
		if [ "$was" != none ]; then
			"$cmd" -P FORWARD "$was"
		else
			"$cmd" -P FORWARD ACCEPT
			fam=ip
			[ "$cmd" = ip6tables ] && fam=ip6
			if "$cmd" -V | grep -q nf_tables && [ "$("$cmd" -S | grep -vc '^-P ')" = 0 ]; then
				nft delete table "$fam" filter
			fi
		fi
		rm -f "$S/forward-policy.$cmd"
	done
}

# start_agent: the freshly built agent in the host namespace, ready.
# Forwarding is enabled only on the uplink and the outside veth (IPv4
# forwarding is per input interface): the machine's own interfaces and its
# global sysctls stay as they were.
start_agent() {
	forward_drop
	run_agent
	forward_on "$UPLINK" "$OUTSIDE_VETH" || die "forwarding on $UPLINK, $OUTSIDE_VETH"
	if [ "$HOST_FORWARD" = drop ]; then
		check "host FORWARD policy DROP, the agent's accepts first (IPv4)" "DROP -j $FW_CHAIN" \
			"$(iptables -S FORWARD | awk '$1 == "-P" {p = $3} $1 == "-A" && !n++ {j = $(NF-1) " " $NF} END {print p, j}')"
		check "the agent's accepts of the pod CIDR, from and to the uplink" 2 \
			"$(iptables -S "$FW_CHAIN" | grep -- "-[sd] $POD_CIDR .*-j ACCEPT" | grep -c -- "-[io] $UPLINK ")"
		check "the agent's accepts of the pod CIDR, from and to veth links' host sides" 2 \
			"$(iptables -S "$FW_CHAIN" | grep -- "-[sd] $POD_CIDR .*-j ACCEPT" | grep -c -- "-[io] shmv+ ")"
	fi
	GATEWAY=$(ip -4 -o addr show dev "$UPLINK" | awk '{print $4}' | cut -d/ -f1)
	[ -n "$GATEWAY" ] || die "the uplink $UPLINK has no IPv4 address"
	# The TUN/TAP fds of an agent without pods (its uplink's).
	# shellcheck disable=SC2034 # the tier scripts read it
	AGENT_TUN_FDS=$(tun_fds "$(pid_of agent)")
}

# run_agent: starts the agent (its log in $S/logs/agent.log) and
# waits until it is ready; start_agent's first step, and a restart's.
run_agent() {
	start_agent_bg agent
	local i
	for i in $(seq 300); do
		[ "$(http_get "$METRICS_ADDR" /readyz 2>/dev/null)" = ok ] && break
		alive agent || die "the agent exited: $(tail -5 "$S/logs/agent.log")"
		sleep 0.1
	done
	[ "$(http_get "$METRICS_ADDR" /readyz)" = ok ] || die "the agent is not ready after 30 s"
}

# start_agent_bg NAME: the agent on the run's state, started as NAME (its
# HTTP server, on loopback, with Go's profiles: goroutines reads one), with
# SHM_AGENT_ARGS (words, optional) after the run's own flags: to measure
# or try the agent's options (SHM_AGENT_ARGS=--poll-max=0 make bench-runsc).
start_agent_bg() {
	local cidrs=$POD_CIDR${POD_CIDR6:+,$POD_CIDR6}
	# shellcheck disable=SC2086 # SHM_AGENT_ARGS is words
	start_bg "$1" "$REPO/bin/shm-agent" --pod-cidr "$cidrs" --cluster-cidr "$cidrs" --uplink "$UPLINK" \
		--socket "$S/agent.sock" --state-dir "$S/state" --sandbox-dir "$S/sb" --metrics-addr "$METRICS_ADDR" --pprof --log-level debug ${SHM_AGENT_ARGS:-}
}

# clean_after_killed_agent: an agent killed (restart_agent KILL) and not
# started again, because the run failed in between, leaves the firewall
# rules it removes itself on SIGTERM. With none of our processes left,
# start it once more on its state and stop it, so that it removes them as
# it does after every run.
clean_after_killed_agent() {
	iptables -S "$FW_CHAIN" 2>/dev/null | grep -q -- "-i $UPLINK " || return 0
	[ -x "$REPO/bin/shm-agent" ] || return 0
	say "the agent was killed and left its firewall rules: starting it once more to remove them"
	start_agent_bg agent-cleanup
	local i
	for i in $(seq 100); do
		[ "$(http_get "$METRICS_ADDR" /readyz 2>/dev/null)" = ok ] && break
		alive agent-cleanup || break
		sleep 0.1
	done
	stop_pid "$(pid_of agent-cleanup)"
}

# restart_agent SIG: the agent killed with SIG (TERM or KILL), gone, and
# started again on the same state directory (as its DaemonSet would); the
# log of the agent that went is kept as agent-before-SIG.log.
restart_agent() {
	local pid i
	pid=$(pid_of agent)
	ours "$pid" || die "no agent of ours to restart"
	kill -"$1" "$pid"
	for i in $(seq 300); do
		alive agent || break
		sleep 0.1
	done
	[ "$i" -lt 300 ] || die "the agent still runs 30 s after SIG$1"
	{ wait "$pid"; } 2>/dev/null || true
	cp "$S/logs/agent.log" "$S/logs/agent-before-$1.log"
	run_agent
}

# write_conflist CNIVERSION
write_conflist() {
	cat >"$S/cni/net.d/10-shm-cni.conflist" <<EOF
{
  "cniVersion": "$1",
  "name": "$CNI_NETWORK",
  "plugins": [{
    "type": "shm-cni",
    "kind": "tap",
    "mtu": 1500,
    "capabilities": {"io.kubernetes.cri.pod-annotations": true, "bandwidth": true},
    "agentSocket": "$S/agent.sock",
    "logFile": "$S/logs/shm-cni.log",
    "logLevel": "debug"
  }]
}
EOF
	cat >"$S/crictl.yaml" <<EOF
runtime-endpoint: unix://$S/containerd/containerd.sock
image-endpoint: unix://$S/containerd/containerd.sock
timeout: 60
EOF
}

# start_containerd CONTAINERD CTR: our containerd on our config, then the
# images imported into the CRI namespace. Shims are found beside CONTAINERD
# first, then in bin/cri (the runsc shim).
start_containerd() {
	local bin=$1 ctr=$2 i
	start_bg containerd env PATH="$(dirname "$bin"):$CRI_BIN:$PATH" "$bin" -c "$S/containerd/config.toml" --log-level info
	for i in $(seq 200); do
		"$ctr" -a "$S/containerd/containerd.sock" version >/dev/null 2>&1 && break
		alive containerd || die "containerd exited: $(tail -5 "$S/logs/containerd.log")"
		sleep 0.1
	done
	"$ctr" -a "$S/containerd/containerd.sock" version >/dev/null 2>&1 || die "containerd is not up after 20 s"
	for i in pause busybox; do
		"$ctr" -a "$S/containerd/containerd.sock" -n k8s.io images import "$S/images/$i.tar" >/dev/null 2>>"$S/logs/ctr.log" ||
			die "import the $i image"
	done
}

# pod_json NAME [ANNOTATIONS]: a pod sandbox config, written to
# $S/pods/NAME.json; ANNOTATIONS is a JSON object.
pod_json() {
	local annotations=${2:-}
	[ -n "$annotations" ] || annotations='{}'
	mkdir -p "$S/logs/pods/$1"
	cat >"$S/pods/$1.json" <<EOF
{"metadata": {"name": "$1", "namespace": "shm-cri", "uid": "uid-$1", "attempt": 0},
 "annotations": $annotations,
 "log_directory": "$S/logs/pods/$1", "linux": {}}
EOF
}

# ctr_json NAME: the server container (the image's /e2e/serve).
ctr_json() {
	cat >"$S/pods/$1-ctr.json" <<EOF
{"metadata": {"name": "serve"}, "image": {"image": "$IMAGE_BUSYBOX"}, "log_path": "serve.log", "linux": {}}
EOF
}

# Pods run by run_server_pod, by name: sandbox ID, container ID, address,
# IPv6 address (dual-stack nodes).
declare -A POD CTR IP IP6

# run_server_pod NAME [HANDLER [ANNOTATIONS]]: a pod with the server
# container (ANNOTATIONS a JSON object, as pod_json's); sets POD[NAME],
# CTR[NAME], IP[NAME] and IP6[NAME] (as CRI reports them).
# shellcheck disable=SC2034 # the tier scripts read them
run_server_pod() {
	local name=$1 handler=${2:-} rt=() p c ip
	[ -n "$handler" ] && rt=(--runtime "$handler")
	pod_json "$name" "${3:-}"
	ctr_json "$name"
	p=$(crictl_ runp "${rt[@]}" "$S/pods/$name.json" 2>>"$S/logs/crictl.log") || die "run pod $name: $(tail -3 "$S/logs/shm-cni.log")"
	c=$(crictl_ create "$p" "$S/pods/$name-ctr.json" "$S/pods/$name.json" 2>>"$S/logs/crictl.log") || die "create the container of $name"
	crictl_ start "$c" >/dev/null || die "start the container of $name"
	ip=$(crictl_ inspectp -o go-template --template '{{.status.network.ip}}' "$p") || die "inspect pod $name"
	POD[$name]=$p
	CTR[$name]=$c
	IP[$name]=$ip
	IP6[$name]=$(crictl_ inspectp -o go-template --template '{{range .status.network.additionalIps}}{{.ip}} {{end}}' "$p" | awk '{print $1}')
}

# in_pod CTR CMD: CMD in the container through CRI exec.
in_pod() {
	local c=$1
	shift
	crictl_ exec "$c" sh -c "$*"
}

# wait_serving CTR: the container's server answers on loopback.
wait_serving() {
	local i
	for i in $(seq 100); do
		in_pod "$1" "printf 'GET /blob.md5 HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 8080" 2>/dev/null | grep -qE '^[0-9a-f]{32}' && return 0
		sleep 0.2
	done
	die "the server in container $1 does not answer on loopback"
}

# Requests made with nc (from a pod via CRI exec, or from the host): the
# peer address the server saw, and the MD5 of the 4 MiB blob.
peer_req="printf 'GET /cgi-bin/peer HTTP/1.0\r\n\r\n' | nc -w 10"
blob_req="printf 'GET /blob HTTP/1.0\r\n\r\n' | nc -w 10"
peer_cmd() { printf '%s' "$peer_req $1 $2 | grep -o 'peer=.*' | cut -d= -f2"; }
blob_cmd() { printf '%s' "$blob_req $1 ${2:-8080} | sed '1,/^\r\$/d' | md5sum | cut -d' ' -f1"; }

# start_host_server NAME NETNS ADDR PORT: the image's server run by the
# host's busybox (inside NETNS unless empty), bound to ADDR:PORT.
start_host_server() {
	local name=$1 netns=$2 addr=$3 port=$4 dir=$S/www-$1 pre=() i
	mkdir -p "$dir/cgi-bin"
	cp "$REPO/test/e2e/cri/image/peer" "$dir/cgi-bin/peer"
	[ -n "$netns" ] && pre=(ip netns exec "$netns")
	start_bg "httpd-$name" "${pre[@]}" /bin/busybox httpd -f -p "$addr:$port" -h "$dir"
	for i in $(seq 50); do
		"${pre[@]}" /bin/busybox sh -c "$peer_req $addr $port" 2>/dev/null | grep -q peer= && return 0
		sleep 0.1
	done
	die "the $name server on $addr:$port does not answer"
}

# attachments_count: attachments the agent lists.
attachments_count() { http_get "$METRICS_ADDR" /attachments | grep -c '"containerID"'; }

# fd_count PID; tun_fds PID: open fds, and those on /dev/net/tun.
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
tun_fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 -lname /dev/net/tun 2>/dev/null | wc -l; }
# goroutines: the agent's goroutines, counted from its goroutine profile
# (--pprof) as the Go tests count them (CountGoroutines in test/e2e/node):
# not those serving HTTP, this reading's among them, nor those with no
# frame yet. The go_goroutines metric would count the goroutines gathering
# the metrics too, a number that varies with the machine's load.
goroutines() {
	http_get "$METRICS_ADDR" '/debug/pprof/goroutine?debug=1' | awk '
		function flush() {
			if (n != "" && frames != "" && frames !~ /net\/http\.\(\*conn\)\.serve|net\/http\.\(\*connReader\)\.backgroundRead/) sum += n
			n = ""; frames = ""
		}
		/^goroutine profile: total / { total = $4; next }
		/^[0-9]+ @/ { flush(); n = $1; next }
		/^#/ { frames = frames $0 "\n"; next }
		/^$/ { flush() }
		END { flush(); if (total != "") print sum + 0 }'
}
# nsfs_mounts: pod network namespaces containerd has mounted.
nsfs_mounts() { awk -v s="$S/containerd/" '$0 ~ / - nsfs / && index($5, s) == 1' /proc/self/mountinfo | wc -l; }
# ipam_allocations: addresses the agent's IPAM state holds.
ipam_allocations() { cat "$S"/state/*/state.json 2>/dev/null | grep -o '"containerID"' | wc -l; }
# attachment_records: the agent's persistent attachment records.
attachment_records() { find "$S/state" -name '*:*.json' 2>/dev/null | wc -l; }
# cni_cache_entries: libcni's result cache entries of our network.
cni_cache_entries() { find /var/lib/cni -name "$CNI_NETWORK-*" 2>/dev/null | wc -l; }

# batch PID N: PID joins the current batch of background jobs; when it
# holds N, wait for them. batch_wait waits for the rest. (A bare wait would
# wait for the servers too.)
BATCH=()
batch() {
	BATCH+=("$1")
	if [ ${#BATCH[@]} -ge "$2" ]; then batch_wait; fi
}
batch_wait() {
	if [ ${#BATCH[@]} -gt 0 ]; then wait "${BATCH[@]}" || true; fi
	BATCH=()
}

# remove_pods: every pod of our containerd, stopped and removed, 5 at a time.
remove_pods() {
	local p
	for p in $(crictl_ pods -q 2>/dev/null); do
		(crictl_ stopp "$p" && crictl_ rmp -f "$p") >/dev/null 2>>"$S/logs/crictl.log" &
		batch $! 5
	done
	batch_wait
}

# teardown: everything the run made, in order: pods (while containerd and
# the agent run, so CNI DEL reaches the agent), containerd, any container
# runc still knows in our root, remaining processes of ours (shims, agent,
# servers), the outside netns, mounts under $S, $S.
teardown() {
	[ -n "${S:-}" ] && [ -d "$S" ] || return 0
	set +e
	local p r
	# A tier's own first steps (tier 3: remove its manifests).
	if declare -F pre_teardown >/dev/null; then pre_teardown; fi
	# A kubelet would restart the pods removed below.
	stop_pid "$(pid_of kubelet)"
	if [ -S "$S/containerd/containerd.sock" ] && ours "$(pid_of containerd)"; then
		remove_pods
	fi
	stop_pid "$(pid_of containerd)"
	for r in "$S"/runc/*; do
		[ -d "$r" ] || continue
		for p in $(runc --root "$r" list -q 2>/dev/null); do
			runc --root "$r" delete --force "$p" >/dev/null 2>&1
		done
	done
	for p in $(our_pids); do
		stop_pid "$p"
	done
	clean_after_killed_agent
	# After the agent: its accepts went with it.
	forward_restore
	# libcni's cached results of pods that were never deleted through CRI
	# (a run killed before its pods were removed).
	grep -lF "\"netns\":\"$S/" /var/lib/cni/results/* 2>/dev/null | xargs -r rm -f
	[ -f "$S/netns" ] && ip netns del "$(cat "$S/netns")" 2>/dev/null
	awk -v s="$S/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
		umount -l "$m" 2>/dev/null
	done
	[ -f "$S/made-run-containerd" ] && rmdir /run/containerd/s /run/containerd 2>/dev/null
	[ -f "$S/made-var-lib-cni" ] && rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null
	[ -f "$S/made-var-lib-kubelet" ] && rm -rf /var/lib/kubelet
	[ -f "$S/made-run-shm-cni" ] && rm -rf /run/shm-cni
	# The kubelet's QoS cgroups, when the run made them (empty by now).
	[ -f "$S/made-kubepods" ] && find /sys/fs/cgroup -mindepth 1 -maxdepth 6 -depth -type d -path '*kubepods*' -exec rmdir {} + 2>/dev/null
	rm -rf "$CRI_BIN/last-logs"
	cp -r "$S/logs" "$CRI_BIN/last-logs" 2>/dev/null
	rm -rf "$S"
	if [ -f "$RUN_RECORD" ]; then
		grep -vxF "$S" "$RUN_RECORD" >"$RUN_RECORD.new"
		mv "$RUN_RECORD.new" "$RUN_RECORD"
	fi
	S=
}

# sweep_stale: with the lock held, any recorded scratch directory belongs
# to a run that was killed before its teardown: tear it down now. The fixed
# names (outside netns) go too.
sweep_stale() {
	local old
	if [ -f "$RUN_RECORD" ]; then
		while read -r old; do
			[ -n "$old" ] || continue
			say "removing what a killed run left in $old"
			S=$old teardown
		done <"$RUN_RECORD"
		rm -f "$RUN_RECORD"
	fi
	ip netns del "$OUTSIDE_NS" 2>/dev/null || true
}

# teardown_and_verify: teardown, then check the machine holds nothing of
# the run: no process, mount, uplink, outside netns or veth.
teardown_and_verify() {
	local s=$S before=none
	[ -f "$S/firewall.before" ] && before=$(cat "$S/firewall.before")
	teardown
	check "teardown: no process of the run left" "" "$(S=$s our_pids | tr '\n' ' ')"
	check "teardown: no mount under the scratch directory left" 0 "$(awk -v s="$s/" 'index($5, s) == 1' /proc/self/mountinfo | wc -l)"
	check "teardown: the uplink $UPLINK is gone" "" "$(ip -o link show "$UPLINK" 2>/dev/null)"
	check "teardown: the outside veth and netns are gone" "" "$(ip -o link show "$OUTSIDE_VETH" 2>/dev/null)$(ls /run/netns/"$OUTSIDE_NS" 2>/dev/null)"
	if [ "$before" != none ]; then
		local after
		after=$(firewall_snapshot)
		check "teardown: the host's firewall (policies, iptables and nftables rules) as before the run" "" \
			"$([ "$before" = "$after" ] || diff <(echo "$before") <(echo "$after"))"
	fi
}

# write_runsc_config SHIM RUNSC: runsc's shim config for the tiers' runsc
# runtime; SHIM adds lines to the shim's options, RUNSC to runsc's own.
write_runsc_config() {
	mkdir -p "$S/runsc/root" "$S/logs/runsc"
	cat >"$S/runsc/runsc.toml" <<EOF
binary_name = "$CRI_BIN/runsc"
root = "$S/runsc/root"
$1
[runsc_config]
  platform = "systrap"
  network = "sandbox"
$2
EOF
}

# write_containerd_config VERSION UNDER_STATE: the tiers' containerd
# config, for Debian's containerd 1.6 (VERSION 1: runc) or containerd v2
# (2: runc, and runsc as write_runsc_config set it up). Pod netns go under
# containerd's state directory when UNDER_STATE is true (tiers 1 and 2), or
# stay in /var/run/netns (tier 3: the manifest mounts that directory into
# the agent, which opens them).
write_containerd_config() {
	local netns=""
	[ "$2" = true ] && netns="netns_mounts_under_state_dir = true"
	if [ "$1" = 1 ]; then
		cat >"$S/containerd/config.toml" <<EOF
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
[grpc]
  address = "$S/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$S/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$IMAGE_PAUSE"
  enable_cdi = false
  $netns
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$S/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$S/cni/bin"
    conf_dir = "$S/cni/net.d"
    max_conf_num = 1
EOF
		return
	fi
	cat >"$S/containerd/config.toml" <<EOF
version = 3
root = "$S/containerd/root"
state = "$S/containerd/state"
[grpc]
  address = "$S/containerd/containerd.sock"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$IMAGE_PAUSE"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime"]
  enable_cdi = false
  $netns
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
        Root = "$S/runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc]
      runtime_type = "io.containerd.runsc.v1"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc.options]
        TypeUrl = "io.containerd.runsc.v1.options"
        ConfigPath = "$S/runsc/runsc.toml"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$S/cni/bin"]
    conf_dir = "$S/cni/net.d"
    max_conf_num = 1
EOF
}

# shm_handler adds the runtime handler runsc-shm ($SHM_HANDLER; the README's
# recipe) to what write_runsc_config and write_containerd_config wrote:
# runsc with --sharedmem-links, and a CNI config directory of its own
# holding the shm-cni conflist of $S/cni/net.d with kind shm (none there:
# the directory stays for the agent's --cni-shm-conf-dir to fill).
shm_handler() {
	cp "$S/runsc/runsc.toml" "$S/runsc/runsc-shm.toml"
	echo '  sharedmem-links = "true"' >>"$S/runsc/runsc-shm.toml"
	mkdir -p "$S/cni/net.d-shm"
	local f
	for f in "$S"/cni/net.d/*.conflist; do
		[ -e "$f" ] || continue
		sed 's/"kind": "tap"/"kind": "shm"/' "$f" >"$S/cni/net.d-shm/${f##*/}"
		grep -q '"kind": "shm"' "$S/cni/net.d-shm/${f##*/}" || die "no kind in the conflist ${f##*/}"
	done
	cat >>"$S/containerd/config.toml" <<EOF
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.$SHM_HANDLER]
      runtime_type = "io.containerd.runsc.v1"
      cni_conf_dir = "$S/cni/net.d-shm"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.$SHM_HANDLER.options]
        TypeUrl = "io.containerd.runsc.v1.options"
        ConfigPath = "$S/runsc/runsc-shm.toml"
EOF
}

# agent_baseline WHAT: removes the pods, waits for the agent to release
# their links, checks that it did, and reads the agent's fds and goroutines
# into AGENT, BASE_FDS and BASE_GR.
agent_baseline() {
	remove_pods
	AGENT=$(pid_of agent)
	settle no_attachments || true
	check "agent: no attachment after $1" 0 "$(attachments_count)"
	BASE_FDS=$(fd_count "$AGENT")
	BASE_GR=$(goroutines)
	[ -n "$BASE_GR" ] || die "the agent's goroutine profile: no count (is --pprof on?)"
	say "agent baseline: $BASE_FDS fds, $BASE_GR goroutines"
}

no_attachments() { [ "$(attachments_count)" -eq 0 ]; }

# back_to_baseline keeps its last readings for the checks after it: a
# reading taken afterwards could catch a passing goroutine.
back_to_baseline() {
	LAST_FDS=$(fd_count "$AGENT")
	LAST_GR=$(goroutines)
	no_attachments && [ "$LAST_FDS" -le "$BASE_FDS" ] && [ "$LAST_GR" -le "$BASE_GR" ]
}

# check_nothing_left: after remove_pods, nothing of the pods is left in the
# runtime, the agent or its state, and the agent's fds are back to
# agent_baseline's.
check_nothing_left() {
	settle back_to_baseline || true
	check "CRI: no pod left" 0 "$(crictl_ pods -q | wc -l)"
	check "no pod netns mount left" 0 "$(nsfs_mounts)"
	check "agent: no attachment left (/attachments)" 0 "$(attachments_count)"
	check "agent: no attachment record left (state)" 0 "$(attachment_records)"
	check "agent: no IPAM allocation left (state)" 0 "$(ipam_allocations)"
	check "agent: TAP/TUN fds back to those it started with (the uplink's)" "$AGENT_TUN_FDS" "$(tun_fds "$AGENT")"
	check "host: no veth link's host side (shmv*) left" "" "$(ip -o link show | awk -F': ' '$2 ~ /^shmv/ {print $2}')"
	check "agent: fds back to the baseline" "$BASE_FDS" "$LAST_FDS"
}

# settle FUNC: FUNC succeeds within 30 s (the agent releases links
# asynchronously); the checks that follow read the values either way.
settle() {
	local i
	for i in $(seq 300); do
		"$1" && return 0
		sleep 0.1
	done
	return 1
}

# on_exit is the tiers' EXIT trap: teardown, keeping the exit status.
on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -n "${S:-}" ]; then
		say "teardown"
		teardown
	fi
	exit "$rc"
}

# finish: the tier's verdict.
finish() {
	local tier=$1
	if [ "$FAILS" -eq 0 ]; then
		echo "PASS: $tier: $CHECKS checks in $(elapsed)"
		return 0
	fi
	echo "FAIL: $tier: $FAILS of $CHECKS checks failed ($(elapsed)); logs: bin/cri/last-logs"
	return 1
}
