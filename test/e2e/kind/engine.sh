# shellcheck shell=bash
# engine.sh is sourced by run.sh: the tier's Docker engine and the guard of
# the host's state.
#
# Where no Docker engine answers, the tier starts Debian's dockerd with its
# own data root (bin/kind/docker: the node image stays there between runs),
# exec root, socket and pid file, all named kind-docker, and stops it at the
# end. Its default runtime is ocicaps (runc without the capabilities this
# machine's init withholds; see ocicaps/main.go). A machine that already
# runs Docker (DOCKER_HOST, or /var/run/docker.sock answering) keeps its
# engine: the tier uses it and leaves it running.
#
# Docker and privileged kind nodes change the host: Docker's bridges and
# veths, its iptables chains and the FORWARD policy, sysctls that systemd
# in a node or a kubelet writes. host_snapshot records iptables-save,
# ip6tables-save, nft list ruleset, links, addresses, routes and sysctl -a
# before the engine starts; host_restore, after it stopped, puts back every
# table, policy, link and sysctl that differs, and host_compare fails the
# tier when anything still differs. The record lives under /run/kind-tier,
# so a run killed half way is restored by the next one.

ENGINE_STATE=/run/kind-tier
DOCKER_EXEC=/run/kind-docker
DOCKER_SOCK=/run/kind-docker.sock
DOCKER_PIDFILE=/run/kind-docker.pid
DOCKER_ROOT=${DOCKER_ROOT:-$REPO/bin/kind/docker}
# The bridge of the default network: a range this machine does not route
# (checked); kind's own network gets a range of Docker's default pools.
DOCKER_BIP=${DOCKER_BIP:-172.29.0.1/24}
# Our engine, when we started one.
# shellcheck disable=SC2034 # run.sh reads it
OWN_ENGINE=no

# sysctl keys that change on their own (counters, random values).
VOLATILE_SYSCTL='^(fs\.(dentry-state|file-nr|inode-nr|inode-state|aio-nr|quota\..*)|kernel\.(ns_last_pid|random\..*|pty\.nr)|net\.netfilter\.nf_conntrack_count) '

# snapshot DIR: the host's firewall, links, addresses, routes and sysctls
# into DIR, one file each, without counters.
snapshot() {
	local d=$1
	mkdir -p "$d"
	iptables-save 2>/dev/null | sed -E '/^#/d; s/ \[[0-9]+:[0-9]+\]$//' >"$d/iptables"
	ip6tables-save 2>/dev/null | sed -E '/^#/d; s/ \[[0-9]+:[0-9]+\]$//' >"$d/ip6tables"
	nft list ruleset 2>/dev/null | sed -E 's/counter packets [0-9]+ bytes [0-9]+/counter/' >"$d/nft"
	ip -o link show | sed -E 's/^[0-9]+: //; s/ +link\/.*//' | sort >"$d/links"
	ip -o addr show | sed -E 's/^[0-9]+: //; s/(valid_lft|preferred_lft) [^ ]+//g' | sort >"$d/addrs"
	{
		ip -4 route show table all
		ip -6 route show table all
	} | sort >"$d/routes"
	sysctl -a 2>/dev/null | grep -Ev "$VOLATILE_SYSCTL" | sort >"$d/sysctl"
}

# host_snapshot: the record before the run (kept if one is there already:
# a killed run's, which host_restore puts back first).
host_snapshot() {
	mkdir -p "$ENGINE_STATE"
	[ -f "$ENGINE_STATE/before/done" ] && return 0
	rm -rf "$ENGINE_STATE/before"
	snapshot "$ENGINE_STATE/before"
	touch "$ENGINE_STATE/before/done"
}

# tables FILE: the table names of an iptables-save dump.
tables() { sed -n 's/^\*//p' "$1"; }

# nft_chains FILE FAMILY TABLE: the chains of table FAMILY TABLE in an
# `nft list ruleset` dump.
nft_chains() {
	awk -v h="table $2 $3 {" '$0 == h {on = 1; next} on && /^}/ {on = 0} on && $1 == "chain" {print $2}' "$1"
}

# restore_xtables CMD FAMILY BEFORE NFT: each table of CMD's (iptables or
# ip6tables) as in BEFORE: a table BEFORE holds goes back to its saved rules
# and policies; a table the run added is emptied and, with the nf_tables
# backend, deleted. With that backend, CMD-restore also makes every built-in
# chain the dump names (CMD-save names them all, made or not): those NFT,
# the nft dump before, did not have go again (nft deletes only empty ones).
restore_xtables() {
	local cmd=$1 fam=$2 before=$3 nft_before=$4 now t ch
	now=$(mktemp)
	"$cmd-save" 2>/dev/null >"$now"
	for t in $(tables "$now"); do
		if tables "$before" | grep -qx "$t"; then
			awk -v t="$t" '/^\*/ {on = ($0 == "*" t)} on' "$before" | sed '$a COMMIT' | awk '!(/^COMMIT$/ && seen++)' |
				"$cmd-restore" || say "restore $cmd table $t failed"
			if "$cmd" -V | grep -q nf_tables && nft list table "$fam" "$t" >"$now.nft" 2>/dev/null; then
				for ch in $(comm -23 <(nft_chains "$now.nft" "$fam" "$t" | sort) <(nft_chains "$nft_before" "$fam" "$t" | sort)); do
					nft delete chain "$fam" "$t" "$ch" 2>/dev/null || say "$fam $t chain $ch: not there before the run, not empty now"
				done
			fi
		else
			"$cmd" -t "$t" -F
			for ch in $("$cmd" -t "$t" -S | awk '$1 == "-N" {print $2}'); do
				"$cmd" -t "$t" -X "$ch"
			done
			for ch in $("$cmd" -t "$t" -S | awk '$1 == "-P" {print $2}'); do
				"$cmd" -t "$t" -P "$ch" ACCEPT
			done
			if "$cmd" -V | grep -q nf_tables; then
				nft delete table "$fam" "$t" 2>/dev/null || true
			fi
		fi
	done
	rm -f "$now" "$now.nft"
}

# host_restore: what the record says, put back.
host_restore() {
	local b=$ENGINE_STATE/before l k v
	[ -f "$b/done" ] || return 0
	set +e
	# Links the run added: Docker's bridges and veths, and kind's.
	snapshot "$ENGINE_STATE/now"
	for l in $(comm -13 <(awk '{print $1}' "$b/links" | sed 's/@.*//; s/:$//' | sort) \
		<(awk '{print $1}' "$ENGINE_STATE/now/links" | sed 's/@.*//; s/:$//' | sort)); do
		case $l in
		docker0 | br-* | veth* | kind*) ip link del "$l" 2>/dev/null ;;
		esac
	done
	restore_xtables iptables ip "$b/iptables" "$b/nft"
	restore_xtables ip6tables ip6 "$b/ip6tables" "$b/nft"
	# Sysctls whose value differs: the value before.
	join -t $'\x01' <(sed 's/ = /\x01/' "$b/sysctl" | sort -t $'\x01' -k1,1) \
		<(sysctl -a 2>/dev/null | sed 's/ = /\x01/' | sort -t $'\x01' -k1,1) |
		awk -F '\x01' '$2 != $3 {print $1 "\x01" $2}' | while IFS=$'\x01' read -r k v; do
		sysctl -q -w "$k=$v" >/dev/null 2>&1 || say "sysctl $k: cannot put back $v"
	done
	rm -rf "$ENGINE_STATE/now"
	set -e
}

# host_compare: the host as the record says; the record goes when it is.
host_compare() {
	local b=$ENGINE_STATE/before f d bad=0
	[ -f "$b/done" ] || return 0
	snapshot "$ENGINE_STATE/after"
	for f in iptables ip6tables nft links addrs routes sysctl; do
		d=$(diff "$b/$f" "$ENGINE_STATE/after/$f" || true) # differences are the report, not an error
		if [ -n "$d" ]; then
			bad=1
			fail "host $f not as before the run:"
			printf '%s\n' "$d" | head -40
		else
			pass "host $f as before the run"
		fi
	done
	[ "$bad" = 0 ] && rm -rf "$ENGINE_STATE"
	return 0
}

# engine_pid: our dockerd's PID, when it runs.
engine_pid() {
	local p
	p=$(cat "$DOCKER_PIDFILE" 2>/dev/null) || return 1
	[ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -q -- "--exec-root $DOCKER_EXEC " && echo "$p"
}

# engine_start: a Docker engine for the run: the machine's, or ours.
engine_start() {
	if [ -n "${DOCKER_HOST:-}" ] || { [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; }; then
		say "using the machine's Docker engine"
		return 0
	fi
	command -v dockerd >/dev/null || die "no dockerd: hack/cri-deps.sh kind installs docker.io"
	routed "${DOCKER_BIP%.*}.0/24" && die "$DOCKER_BIP is routed on this machine already; set DOCKER_BIP"
	# shellcheck disable=SC2034 # run.sh reads it
	OWN_ENGINE=yes
	mkdir -p "$DOCKER_ROOT" "$ENGINE_STATE"
	CGO_ENABLED=0 go build -o "$ENGINE_STATE/ocicaps" "$REPO/test/e2e/kind/ocicaps" || die "build ocicaps"
	# What dockerd makes outside its roots, whatever its flags: its trust key
	# /etc/docker/key.json, /run/docker/plugins, and containerd 1.6's shim
	# socket directory /run/containerd/s; ours go at the end (the
	# directories only when empty: another runtime may use them by then).
	[ -e /etc/docker/key.json ] || touch "$ENGINE_STATE/made-docker-key"
	[ -e /run/docker ] || touch "$ENGINE_STATE/made-run-docker"
	[ -e /run/containerd ] || touch "$ENGINE_STATE/made-run-containerd"
	# Debian's docker CLI, whatever else is first in PATH.
	mkdir -p "$ENGINE_STATE/bin"
	ln -sf "$(command -v -p docker || echo /usr/bin/docker)" "$ENGINE_STATE/bin/docker"
	dockerd --data-root "$DOCKER_ROOT" --exec-root "$DOCKER_EXEC" -H "unix://$DOCKER_SOCK" --pidfile "$DOCKER_PIDFILE" \
		--bip "$DOCKER_BIP" --add-runtime "ocicaps=$ENGINE_STATE/ocicaps" --default-runtime ocicaps \
		--log-level warn >"$ENGINE_STATE/dockerd.log" 2>&1 {LOCK_FD}>&- &
	for _ in $(seq 100); do
		DOCKER_HOST=unix://$DOCKER_SOCK /usr/bin/docker info >/dev/null 2>&1 && break
		sleep 0.2
	done
	export DOCKER_HOST=unix://$DOCKER_SOCK
	export PATH=$ENGINE_STATE/bin:$PATH
	docker info >/dev/null 2>&1 || die "dockerd did not start: $(tail -5 "$ENGINE_STATE/dockerd.log")"
	say "dockerd $(docker version -f '{{.Server.Version}}') on $DOCKER_SOCK, data root $DOCKER_ROOT"
}

# engine_stop: our dockerd stopped (its containers first), its exec root
# and socket gone.
engine_stop() {
	local p
	p=$(engine_pid) || p=
	if [ -n "$p" ]; then
		local ids
		ids=$(docker ps -aq 2>/dev/null)
		# shellcheck disable=SC2086 # the IDs
		[ -z "$ids" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
		docker network prune -f >/dev/null 2>&1
		kill -TERM "$p"
		for _ in $(seq 300); do
			kill -0 "$p" 2>/dev/null || break
			sleep 0.1
		done
		kill -0 "$p" 2>/dev/null && kill -KILL "$p"
	fi
	# Mounts dockerd left (its exec root, a killed engine's overlays).
	awk -v a="$DOCKER_EXEC/" -v b="$DOCKER_ROOT/" 'index($5, a) == 1 || index($5, b) == 1 {print $5}' /proc/self/mountinfo |
		sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
	rm -rf "$DOCKER_EXEC" "$DOCKER_SOCK" "$DOCKER_PIDFILE" "${ENGINE_STATE:?}/bin" "$ENGINE_STATE/ocicaps"
	if [ -f "$ENGINE_STATE/made-docker-key" ]; then
		rm -f /etc/docker/key.json "$ENGINE_STATE/made-docker-key"
	fi
	if [ -f "$ENGINE_STATE/made-run-docker" ]; then
		rmdir /run/docker/plugins /run/docker 2>/dev/null || true
		rm -f "$ENGINE_STATE/made-run-docker"
	fi
	if [ -f "$ENGINE_STATE/made-run-containerd" ]; then
		rmdir /run/containerd/s /run/containerd 2>/dev/null || true
		rm -f "$ENGINE_STATE/made-run-containerd"
	fi
	return 0
}
