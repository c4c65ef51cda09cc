#!/usr/bin/env bash
# Tier 5: shm-cni in a kind cluster (one control plane, two workers), with
# nothing pulled from a registry.
#
#   test/e2e/kind/run.sh              # from anywhere, as root
#   E2E=1 test/e2e/kind/run.sh        # and Kubernetes' [sig-network] [Conformance] tests
#   KEEP=1 test/e2e/kind/run.sh       # leave the cluster and engine up, and
#                                     # the lock held (CLEANUP=1 removes them)
#   LINK_KIND=tap test/e2e/kind/run.sh   # kernel pods on tap links (through
#                                     # the agent): the manifest's conflist
#                                     # with that kind (veth, its default)
#
# Before it takes the lock: hack/cri-deps.sh kind (docker.io, debootstrap,
# kind, containerd v2, Kubernetes, etcd, CoreDNS, agnhost; e2e.test with
# E2E=1), hack/kind-node-image.sh (the node image, its images preloaded)
# and make image. Then, holding the runtime tiers' lock: a snapshot of the
# host (engine.sh), a Docker engine of its own unless the machine runs one,
# the node image imported, the cluster created (cluster.yaml:
# disableDefaultCNI), the shm-cni image loaded and deploy/shm-cni.yaml
# applied unchanged. Checks, each printed as PASS or FAIL:
#   - every node NotReady before shm-cni, Ready only after its agent;
#   - each agent took its pod CIDR from its Node (the uplink routes it) and
#     routes every other node's pod CIDR via that node's address;
#   - pod <-> pod on one node and across nodes, each side seeing the other's
#     own address (no masquerade inside the cluster), and 4 MiB transfers
#     whose MD5 matches; a ClusterIP Service and a NodePort (kube-proxy);
#     DNS through CoreDNS; node <-> pod; pod -> outside (a container of the
#     run on kind's network) masqueraded to the node's address;
#   - a hostPort (portmap, which the agents installed and chained): reached
#     at the node's address from a pod on the other node, a pod on the same
#     node, the machine and the node itself; nothing of it left after the
#     pod's deletion;
#   - a worker restarted (docker restart): its pods run again with working
#     networking, and its agent holds exactly their links and addresses;
#   - the DaemonSet rolled to a new image under a busy pod <-> pod
#     connection across nodes, which carries every byte; the new agents
#     installed the new image's shm-cni and portmap;
#   - memory and CPU of the three nodes (docker stats), reported;
#   - after the engine stopped: the host's firewall, links, addresses,
#     routes and sysctls as before the run.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../cri/lib.sh
. "$(dirname "$0")/../cri/lib.sh"
# shellcheck source=engine.sh
. "$(dirname "$0")/engine.sh"

CLUSTER=shm-cni # cluster.yaml's name
KIND=$CRI_BIN/kind
K8S_BIN=$CRI_BIN/k8s
NS=kind-e2e
IMAGE_ARCHIVE=$REPO/bin/shm-cni-image.tar
NEXT_TAG=shm-cni:kind-next
TIMEOUT=${TIMEOUT:-300s}
BLOB=4194304 # bytes each transfer carries (4 MiB)
STREAM_SECONDS=${STREAM_SECONDS:-120}
export KUBECONFIG=$ENGINE_STATE/kubeconfig
# kubectl's discovery and HTTP caches: the run's, not ~/.kube/cache.
export KUBECACHEDIR=$ENGINE_STATE/kube-cache

need_root
cd "$REPO"

# --- builds, before the lock -------------------------------------------------
if [ "${CLEANUP:-0}" != 1 ]; then
	say "deps (hack/cri-deps.sh kind: built once)"
	hack/cri-deps.sh kind
	[ "${E2E:-0}" = 1 ] && hack/cri-deps.sh e2e
	say "node image (hack/kind-node-image.sh: built once per input)"
	hack/kind-node-image.sh
	say "image (make image)"
	make --no-print-directory image >/dev/null || die "make image"
	# The next image: the same sources, another build ID, so another digest.
	CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags='-s -buildid=kind-next' -o bin/kind/next/ \
		./cmd/shm-agent ./cmd/shm-cni github.com/containernetworking/plugins/plugins/meta/portmap ||
		die "build the next image's binaries"
	go run ./hack/image -bin bin/kind/next -o "$REPO/bin/shm-cni-image-next.tar" --tag "$NEXT_TAG" 2>/dev/null || die "the next image"
fi
NODE_IMAGE=$(cat bin/kind/node-image)
NODE_TAR=bin/kind/node-${NODE_IMAGE##*:}.tar
# shellcheck source=/dev/null
. bin/kind/images.env

kubectl_() { "$K8S_BIN/kubectl" "$@"; }
kind_() { "$KIND" "$@"; }

# A kept cluster's lock holder lets go (CLEANUP=1, or a new run).
if [ -f "$ENGINE_STATE/lock-holder.pid" ]; then
	p=$(cat "$ENGINE_STATE/lock-holder.pid")
	[ "$(cat "/proc/$p/comm" 2>/dev/null)" = sleep ] && kill "$p"
	rm -f "$ENGINE_STATE/lock-holder.pid"
fi
lock
# A run killed half way: its engine and cluster go, the host goes back.
sweep() {
	if engine_pid >/dev/null; then
		( # its own environment: this run's engine is not yet chosen
			# shellcheck disable=SC2030
			export DOCKER_HOST=unix://$DOCKER_SOCK PATH=$ENGINE_STATE/bin:$PATH
			kind_ delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
			engine_stop
		)
	fi
	host_restore
}
on_exit_kind() {
	local rc=$?
	trap - EXIT INT TERM
	if [ "${KEEP:-0}" = 1 ]; then
		[ "$FAILS" -eq 0 ] || rc=1
		# A process inheriting the lock's fd holds it while the cluster is up.
		sleep 86400 >/dev/null 2>&1 &
		echo $! >"$ENGINE_STATE/lock-holder.pid"
		# shellcheck disable=SC2031
		say "KEEP=1: cluster $CLUSTER and engine left up, the lock held (KUBECONFIG=$KUBECONFIG DOCKER_HOST=${DOCKER_HOST:-}); CLEANUP=1 $0 removes them"
		exit "$rc"
	fi
	if [ "$rc" != 0 ]; then
		say "diagnostics"
		kubectl_ get nodes -o wide 2>&1 | sed 's/^/  /'
		kubectl_ get pods -A -o wide 2>&1 | sed 's/^/  /'
		kubectl_ -n shm-cni logs -l app.kubernetes.io/name=shm-agent --tail=30 --prefix 2>&1 | sed 's/^/  /'
	fi
	say "teardown"
	[ -n "$(engine_pid)" ] || [ "$OWN_ENGINE" = no ] || true
	kind_ delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
	docker rm -f kind-outside >/dev/null 2>&1 || true
	if [ "$OWN_ENGINE" = yes ] || engine_pid >/dev/null; then
		engine_stop
	fi
	host_restore
	host_compare
	rm -f "$KUBECONFIG"
	if [ "$rc" = 0 ]; then
		finish "tier 5 (kind, Kubernetes $(cat "$K8S_BIN/kubelet.version"), three nodes, shm-cni)" || rc=1
	else
		echo "FAIL: tier 5 stopped early (exit $rc)"
	fi
	exit "$rc"
}
trap on_exit_kind EXIT
trap 'exit 130' INT TERM
sweep
if [ "${CLEANUP:-0}" = 1 ]; then
	say "removed a kept cluster and engine"
	exit 0
fi
host_snapshot
engine_start
[ "$OWN_ENGINE" = yes ] || OWN_ENGINE=no

# --- the cluster -------------------------------------------------------------
if ! docker image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
	t=$(date +%s%N)
	docker load -i "$NODE_TAR" >/dev/null || die "docker load $NODE_TAR"
	say "loaded $NODE_IMAGE in $(since "$t") s"
	# Older node images in the data root go (2 GB each).
	docker images --format '{{.Repository}}:{{.Tag}}' "${NODE_IMAGE%:*}" | grep -vxF "$NODE_IMAGE" |
		xargs -r docker rmi >/dev/null 2>&1 || true
fi
t=$(date +%s%N)
retain=()
[ "${KEEP:-0}" = 1 ] && retain=(--retain) # a failed creation's nodes stay for a look
kind_ create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --config test/e2e/kind/cluster.yaml --wait 0s "${retain[@]}" ||
	die "kind create cluster"
say "cluster created in $(since "$t") s"
NODES=$(kubectl_ get nodes -o jsonpath='{.items[*].metadata.name}')
read -r -a workers <<<"$(kubectl_ get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')"
check "three nodes, two of them workers" "3 2" "$(wc -w <<<"$NODES") ${#workers[@]}"
W1=${workers[0]} W2=${workers[1]}
node_ready() { kubectl_ get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }
for n in $NODES; do
	check "node $n NotReady before shm-cni (no pod network)" False "$(node_ready "$n")"
done

t=$(date +%s%N)
kind_ load image-archive "$IMAGE_ARCHIVE" --name "$CLUSTER" >/dev/null || die "kind load image-archive"
kind_ load image-archive "$REPO/bin/shm-cni-image-next.tar" --name "$CLUSTER" >/dev/null || die "kind load the next image"
say "images loaded in $(since "$t") s"
MANIFEST=deploy/shm-cni.yaml
if [ -n "${LINK_KIND:-}" ]; then
	MANIFEST=$ENGINE_STATE/shm-cni.yaml
	sed 's/"kind": "veth"/"kind": "'"$LINK_KIND"'"/' deploy/shm-cni.yaml >"$MANIFEST"
	grep -qF "\"kind\": \"$LINK_KIND\"" "$MANIFEST" || die "the manifest changed: no conflist kind to set (update run.sh)"
	say "kernel pods on $LINK_KIND links (LINK_KIND)"
fi
kubectl_ apply -f "$MANIFEST" >/dev/null || die "apply $MANIFEST"
kubectl_ -n shm-cni rollout status ds/shm-agent --timeout="$TIMEOUT" >/dev/null || die "the agent DaemonSet is not ready"
kubectl_ wait --for=condition=Ready nodes --all --timeout="$TIMEOUT" >/dev/null || die "nodes not Ready"
say "shm-cni ready, nodes Ready, $(since "$t") s after the load"

# Ready only after the agent: the node's Ready transition is not before its
# agent started, nor before the agent, once ready, wrote the conflist (the
# agent pod's own Ready condition follows its readiness probe, later).
for n in $NODES; do
	agent=$(kubectl_ -n shm-cni get pods -l app.kubernetes.io/name=shm-agent --field-selector "spec.nodeName=$n" -o jsonpath='{.items[0].metadata.name}')
	started=$(kubectl_ -n shm-cni get pod "$agent" -o jsonpath='{.status.containerStatuses[0].state.running.startedAt}')
	conf=$(docker exec "$n" date -u -r /etc/cni/net.d/10-shm-cni.conflist +%Y-%m-%dT%H:%M:%SZ)
	nt=$(kubectl_ get node "$n" -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastTransitionTime}')
	check "node $n Ready ($nt) not before its agent started ($started) and wrote the conflist ($conf)" yes \
		"$([[ ! "$nt" < "$started" ]] && [[ ! "$nt" < "$conf" ]] && echo yes)"
done

# Pod CIDRs and routes.
declare -A CIDR NODEIP
for n in $NODES; do
	CIDR[$n]=$(kubectl_ get node "$n" -o jsonpath='{.spec.podCIDR}')
	NODEIP[$n]=$(kubectl_ get node "$n" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
done
for n in $NODES; do
	routes=$(docker exec "$n" ip -4 route show)
	check "node $n: its pod CIDR ${CIDR[$n]} routed to the agent's uplink" 1 "$(grep -c "^${CIDR[$n]} dev shm0" <<<"$routes")"
	for o in $NODES; do
		[ "$o" = "$n" ] && continue
		check "node $n: ${CIDR[$o]} of $o via ${NODEIP[$o]}" 1 "$(grep -c "^${CIDR[$o]} via ${NODEIP[$o]} " <<<"$routes")"
	done
done

# --- pods --------------------------------------------------------------------
say "test pods: a and b on $W1, c on $W2"
kubectl_ create namespace "$NS" >/dev/null
# pod NAME NODE [RUNTIMECLASS]: agnhost netexec on 8080, a 4 MiB blob
# served on 9000, a stream on 9001; label app=web without a runtime class.
pod() {
	cat <<EOF
---
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS, labels: {app: ${3:-web}}}
spec:
  nodeName: $2
  runtimeClassName: ${3:-null}
  terminationGracePeriodSeconds: 1
  containers:
    - name: web
      image: $AGNHOST
      args: [netexec, --http-port=8080]
      readinessProbe: {httpGet: {path: /hostname, port: 8080}, periodSeconds: 2}
    - name: blob
      image: $AGNHOST
      readinessProbe: {tcpSocket: {port: 9000}, periodSeconds: 2}
      command: [sh, -c]
      args:
        - head -c $BLOB /dev/urandom >/tmp/blob && md5sum </tmp/blob | cut -d' ' -f1 >/tmp/blob.md5 &&
          (socat TCP-LISTEN:9001,reuseaddr,fork SYSTEM:'i=0; while [ \$i -lt $STREAM_SECONDS ]; do head -c 1048576 /dev/zero; sleep 1; i=\$((i+1)); done' &) &&
          exec socat -U TCP-LISTEN:9000,reuseaddr,fork OPEN:/tmp/blob,rdonly
EOF
}
{
	pod a "$W1"
	pod b "$W1"
	pod c "$W2"
	cat <<EOF
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: $NS}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: $NS}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
EOF
} >"$ENGINE_STATE/pods.yaml"
kubectl_ apply -f "$ENGINE_STATE/pods.yaml" >/dev/null
kubectl_ -n "$NS" wait --for=condition=Ready pod/a pod/b pod/c --timeout="$TIMEOUT" >/dev/null || die "test pods not Ready"
declare -A IP
podips() {
	for p in a b c; do IP[$p]=$(kubectl_ -n "$NS" get pod "$p" -o jsonpath='{.status.podIP}'); done
}
podips
for p in a b c; do
	n=$(kubectl_ -n "$NS" get pod "$p" -o jsonpath='{.spec.nodeName}')
	check "pod $p address ${IP[$p]} in $n's pod CIDR" yes "$(awk -v ip="${IP[$p]}" -v net="${CIDR[$n]%.*/*}." 'BEGIN {print (index(ip, net) == 1) ? "yes" : "no"}')"
	check "pod $p on a ${LINK_KIND:-veth} link, up" 1 \
		"$(docker exec "$n" curl -fsS --max-time 5 http://127.0.0.1:9309/metrics | awk -v p="pod=\"$p\"" -v k="kind=\"${LINK_KIND:-veth}\"" '/^shm_cni_link_up\{/ && index($0, p) && index($0, k) {print $NF}')"
done
in_pod() { # in_pod POD CMD
	local p=$1
	shift
	kubectl_ -n "$NS" exec "$p" -c web -- sh -c "$*" 2>/dev/null
}
clientip() { in_pod "$1" "curl -fsS --max-time 5 http://$2:8080/clientip" | cut -d: -f1; }
md5_of() { kubectl_ -n "$NS" exec "$1" -c blob -- cat /tmp/blob.md5 2>/dev/null; }
fetch_md5() { in_pod "$1" "socat -u TCP:$2:9000,connect-timeout=5 STDOUT | md5sum | cut -d' ' -f1"; }

# pairs: same node (a, b), across nodes (a, c), both directions.
connectivity() {
	local what=$1 from to
	for pair in a:b b:a a:c c:a b:c; do
		from=${pair%:*} to=${pair#*:}
		check "$what: pod $from -> pod $to, $to sees $from's own address" "${IP[$from]}" "$(clientip "$from" "${IP[$to]}")"
	done
	for pair in b:a c:a a:c; do
		from=${pair%:*} to=${pair#*:}
		check "$what: pod $from fetches 4 MiB from pod $to, MD5 as at $to" "$(md5_of "$to")" "$(fetch_md5 "$from" "${IP[$to]}")"
	done
}
connectivity "pod network"

svc=$(kubectl_ -n "$NS" get svc web -o jsonpath='{.spec.clusterIP}')
check "DNS through CoreDNS: web.$NS resolves to the ClusterIP" "$svc" "$(in_pod a "dig +short +time=3 web.$NS.svc.cluster.local")"
check "DNS through CoreDNS: the resolver of a pod finds kubernetes.default" 10.96.0.1 "$(in_pod c "getent hosts kubernetes.default.svc.cluster.local | cut -d' ' -f1")"
# 30 requests miss one of 3 endpoints with a chance of 3 * (2/3)^30, 1.5e-5.
hosts=$(in_pod a "for i in \$(seq 30); do curl -fsS --max-time 5 http://web.$NS/hostname; echo; done" | sort -u | grep -c .)
check "ClusterIP Service (kube-proxy): pod a reaches the 3 endpoints through web.$NS by name (30 requests)" 3 "$hosts"
np=$(kubectl_ -n "$NS" get svc web-np -o jsonpath='{.spec.ports[0].nodePort}')
check "NodePort $np on $W2 from pod a (other node)" yes "$(in_pod a "curl -fsS --max-time 5 http://${NODEIP[$W2]}:$np/hostname" | grep -qE '^(a|b|c)$' && echo yes)"
check "NodePort $np on $W1 from the machine (Docker's network)" yes "$(curl -fsS --max-time 5 "http://${NODEIP[$W1]}:$np/hostname" | grep -qE '^(a|b|c)$' && echo yes)"
check "node $W1 -> pod a (same node)" a "$(docker exec "$W1" curl -fsS --max-time 5 "http://${IP[a]}:8080/hostname")"
check "node $W1 -> pod c (other node)" c "$(docker exec "$W1" curl -fsS --max-time 5 "http://${IP[c]}:8080/hostname")"
check "pod a -> its node $W1 (kubelet's port)" yes "$(in_pod a "/agnhost connect --timeout=5s ${NODEIP[$W1]}:10250" >/dev/null && echo yes)"
check "pod a -> node $W2 (kubelet's port)" yes "$(in_pod a "/agnhost connect --timeout=5s ${NODEIP[$W2]}:10250" >/dev/null && echo yes)"
check "pod a -> the API server through the kubernetes Service" yes "$(in_pod a "curl -ks --max-time 5 https://kubernetes.default/livez" | grep -q ok && echo yes)"

# The outside: a container of the run on kind's network, answering with the
# address it sees; pods reach it masqueraded to their node's address.
docker image inspect "$TOOLS_IMAGE" >/dev/null 2>&1 ||
	docker import "$TOOLS_TAR" "$TOOLS_IMAGE" >/dev/null || die "docker import $TOOLS_TAR"
docker run -d --name kind-outside --network kind "$TOOLS_IMAGE" \
	socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo $SOCAT_PEERADDR' >/dev/null || die "the outside container"
OUT_IP=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' kind-outside)
sleep 1
check "pod a -> outside ($OUT_IP) masqueraded to its node's address" "${NODEIP[$W1]}" "$(in_pod a "socat -u TCP:$OUT_IP:8080,connect-timeout=5 STDOUT")"
check "pod c -> outside ($OUT_IP) masqueraded to its node's address" "${NODEIP[$W2]}" "$(in_pod c "socat -u TCP:$OUT_IP:8080,connect-timeout=5 STDOUT")"

# --- hostPort (portmap, chained after shm-cni) --------------------------------
# Each agent installed the image's portmap beside shm-cni (the node image has
# a portmap of its own, which the agent replaces), and both conflists chain
# it. Pod hp on $W2 has a hostPort, reached at $W2's address from a pod on
# the other node (masqueraded to its node's address on the way out, as to
# any address outside the cluster CIDRs), from the machine (its own
# address), from a pod on $W2 (its own address: the router sends the
# replies back through the host, which undoes the DNAT), and from $W2 itself at its address and at 127.0.0.1 (portmap's
# masquerade). Deleting hp removes its rules: portmap's own chains
# (CNI-HOSTPORT-*) stay, as portmap leaves them, with nothing of hp.
HOSTPORT=28080
for n in $NODES; do
	agent=$(kubectl_ -n shm-cni get pods -l app.kubernetes.io/name=shm-agent --field-selector "spec.nodeName=$n" -o jsonpath='{.items[0].metadata.name}')
	check "node $n: the agent installed portmap beside shm-cni; the conflist and the shm conflist chain it" "yes 1 1" \
		"$([ "$(kubectl_ -n shm-cni logs "$agent" | grep -cF '"msg":"CNI binary installed","path":"/host/opt/cni/bin/portmap"')" -gt 0 ] && echo yes) $(docker exec "$n" \
			grep -c '"type": "portmap"' /etc/cni/net.d/10-shm-cni.conflist) $(docker exec "$n" grep -c '"type": "portmap"' /etc/cni/net.d-shm/10-shm-cni.conflist)"
done
say "hostPort: pod hp on $W2, container port 8080 at $W2's port $HOSTPORT"
cat >"$ENGINE_STATE/hostport.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: hp, namespace: $NS}
spec:
  nodeName: $W2
  terminationGracePeriodSeconds: 1
  containers:
    - name: web
      image: $AGNHOST
      args: [netexec, --http-port=8080]
      ports: [{containerPort: 8080, hostPort: $HOSTPORT, protocol: TCP}]
      readinessProbe: {httpGet: {path: /hostname, port: 8080}, periodSeconds: 2}
EOF
kubectl_ apply -f "$ENGINE_STATE/hostport.yaml" >/dev/null
if kubectl_ -n "$NS" wait --for=condition=Ready pod/hp --timeout="$TIMEOUT" >/dev/null; then
	HP=${NODEIP[$W2]}:$HOSTPORT
	seen() { cut -d: -f1 <<<"$1"; } # the client's address in netexec's /clientip
	check "hostPort: pod a on $W1 -> $HP reaches hp, which sees $W1's address (pod a masqueraded)" "hp ${NODEIP[$W1]}" \
		"$(in_pod a "curl -fsS --max-time 5 http://$HP/hostname") $(seen "$(in_pod a "curl -fsS --max-time 5 http://$HP/clientip")")"
	me=$(ip -4 -o route get "${NODEIP[$W2]}" | sed -n 's/.* src \([0-9.]*\).*/\1/p')
	check "hostPort: the machine -> $HP reaches hp, which sees the machine's address $me" "hp $me" \
		"$(curl -fsS --max-time 5 "http://$HP/hostname") $(seen "$(curl -fsS --max-time 5 "http://$HP/clientip")")"
	check "hostPort: pod c on $W2 -> $HP reaches hp, which sees c's own address ${IP[c]} (the router sends hp's replies back through the host)" "hp ${IP[c]}" \
		"$(in_pod c "curl -fsS --max-time 5 http://$HP/hostname") $(seen "$(in_pod c "curl -fsS --max-time 5 http://$HP/clientip")")"
	check "hostPort: node $W2 -> $HP and 127.0.0.1:$HOSTPORT reach hp" "hp hp" \
		"$(docker exec "$W2" curl -fsS --max-time 5 "http://$HP/hostname") $(docker exec "$W2" curl -fsS --max-time 5 "http://127.0.0.1:$HOSTPORT/hostname")"
	sandbox=$(docker exec "$W2" crictl pods --name hp --namespace "$NS" -q)
	# portmap's rules of hp: those naming its sandbox, its chain, its port.
	portmap_rules() { docker exec "$W2" iptables-save -t nat | grep -cE -- "${sandbox:-no sandbox}|^:CNI-DN-|dports? $HOSTPORT( |$)" || true; }
	rules=$(portmap_rules)
	check "hostPort: portmap's NAT rules for hp on $W2 (sandbox ${sandbox:0:12})" yes "$([ -n "$sandbox" ] && [ "$rules" -gt 0 ] && echo yes)"
	kubectl_ -n "$NS" delete pod hp --wait --timeout=120s >/dev/null || fail "delete pod hp"
	for _ in $(seq 15); do
		left=$(portmap_rules)
		[ "$left" = 0 ] && break
		sleep 1
	done
	check "hostPort: after hp's deletion no rule of portmap's for it on $W2 (were $rules)" 0 "$left"
	check "hostPort: after hp's deletion $HP answers nothing" refused \
		"$(curl -fsS --max-time 5 "http://$HP/hostname" >/dev/null 2>&1 && echo answered || echo refused)"
else
	fail "pod hp Ready: $(kubectl_ -n "$NS" get pod hp -o wide 2>&1 | tail -1)"
	kubectl_ -n "$NS" delete pod hp --wait --timeout=120s >/dev/null 2>&1 || true
fi

# --- resources ---------------------------------------------------------------
say "resources of the three nodes, test pods and agents running: memory (docker stats), CPU over 30 s idle (cgroup cpuacct)"
cpu_ns() { cat "/sys/fs/cgroup/cpuacct/docker/$(docker inspect -f '{{.Id}}' "$1")/cpuacct.usage" 2>/dev/null || echo 0; }
declare -A CPU0
for n in $NODES; do CPU0[$n]=$(cpu_ns "$n"); done
sleep 30
for n in $NODES; do
	echo "  $n: $(awk -v a="${CPU0[$n]}" -v b="$(cpu_ns "$n")" 'BEGIN {printf "%.1f%% of a core", (b - a) / 30e9 * 100}')"
done
# shellcheck disable=SC2086 # the node names
docker stats --no-stream --format '  {{.Name}}: {{.MemUsage}} memory, {{.CPUPerc}} CPU' $NODES
for n in $NODES; do
	echo "  $n top processes by RSS (MiB):"
	docker exec "$n" ps -eo rss=,comm= | sort -rn | head -6 | awk '{printf "    %-24s %6.0f\n", $2, $1/1024}'
done

# --- a worker restarted ------------------------------------------------------
# leaks NODE: the agent's attachments and IPAM allocations, and the pods
# the runtime runs off the host network, on NODE.
leaks() {
	local n=$1 att alloc pods
	att=$(docker exec "$n" curl -fsS --max-time 5 http://127.0.0.1:9309/attachments | grep -o '"containerID"' | wc -l)
	alloc=$(docker exec "$n" sh -c 'cat /var/lib/shm-cni/*/state.json 2>/dev/null' | grep -o '"containerID"' | wc -l)
	pods=$(kubectl_ get pods -A --field-selector "spec.nodeName=$n,status.phase=Running" -o jsonpath='{range .items[*]}{.spec.hostNetwork}{"\n"}{end}' | grep -vc true)
	echo "$att $alloc $pods"
}
say "restarting $W2 (docker restart)"
ctr_id() { kubectl_ -n "$NS" get pod c -o jsonpath='{.status.containerStatuses[?(@.name=="web")].containerID}'; }
c_ready() { kubectl_ -n "$NS" get pod c -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }
before=$(ctr_id)
t=$(date +%s%N)
docker restart "$W2" >/dev/null
for _ in $(seq 150); do
	[ "$(ctr_id)" != "$before" ] && [ "$(c_ready)" = True ] && [ "$(node_ready "$W2")" = True ] && break
	sleep 2
done
say "$W2 Ready and pod c running again in new containers $(since "$t") s after the restart"
check "pod c on $W2 runs in new containers, Ready" "yes True" "$([ "$(ctr_id)" != "$before" ] && echo yes) $(c_ready)"
check "node $W2 Ready after its restart" True "$(node_ready "$W2")"
podips
connectivity "after $W2 restarted"
for _ in $(seq 30); do
	read -r att alloc pods <<<"$(leaks "$W2")"
	[ "$att" = "$pods" ] && [ "$alloc" = "$pods" ] && break
	sleep 2
done
check "node $W2: the agent's attachments, IPAM allocations = pods off the host network" "$pods $pods" "$att $alloc"
check "node $W2: pod netns mounts = pods off the host network" "$pods" "$(docker exec "$W2" sh -c 'ls /var/run/netns 2>/dev/null | wc -l')"

# --- rolling update under a busy connection ----------------------------------
say "rolling update of the DaemonSet to $NEXT_TAG under a stream from pod c to pod a (${STREAM_SECONDS} MiB over ${STREAM_SECONDS} s)"
agent_image_ids() { kubectl_ -n shm-cni get pods -l app.kubernetes.io/name=shm-agent -o jsonpath='{.items[*].status.containerStatuses[0].imageID}' | tr ' ' '\n' | sort -u; }
OLD_ID=$(agent_image_ids)
t=$(date +%s%N)
kubectl_ -n "$NS" exec a -c web -- sh -c "socat -u TCP:${IP[c]}:9001,connect-timeout=5 STDOUT | wc -c" >"$ENGINE_STATE/stream.count" 2>&1 &
stream=$!
sleep 5
kubectl_ -n shm-cni set image ds/shm-agent "shm-agent=$NEXT_TAG" >/dev/null
kubectl_ -n shm-cni rollout status ds/shm-agent --timeout="$TIMEOUT" >/dev/null || fail "the rollout to $NEXT_TAG"
say "rolled out in $(since "$t") s"
check "every agent runs $NEXT_TAG" "$NEXT_TAG $NEXT_TAG $NEXT_TAG" \
	"$(kubectl_ -n shm-cni get pods -l app.kubernetes.io/name=shm-agent -o jsonpath='{.items[*].spec.containers[0].image}')"
NEW_ID=$(agent_image_ids)
check "the agents' image changed (digest ${OLD_ID##*:} -> ${NEW_ID##*:})" yes "$([ "$(wc -l <<<"$NEW_ID")" = 1 ] && [ "$OLD_ID" != "$NEW_ID" ] && echo yes)"
wait "$stream" || true
check "the stream across nodes carried on through the rollout: every byte" $((STREAM_SECONDS * 1048576)) "$(tr -d ' ' <"$ENGINE_STATE/stream.count")"
say "stream done $(since "$t") s after it started"
connectivity "after the rollout"
# The new agents installed the new image's CNI binaries (another build ID:
# other bytes), each once it was ready.
want_bins=$(sha256sum bin/kind/next/shm-cni bin/kind/next/portmap | cut -d' ' -f1 | tr '\n' ' ')
for n in $NODES; do
	for _ in $(seq 20); do
		got_bins=$(docker exec "$n" sha256sum /opt/cni/bin/shm-cni /opt/cni/bin/portmap | cut -d' ' -f1 | tr '\n' ' ')
		[ "$got_bins" = "$want_bins" ] && break
		sleep 1
	done
	check "node $n after the rollout: shm-cni and portmap are the new image's (SHA-256)" "$want_bins" "$got_bins"
done
for n in "$W1" "$W2"; do
	read -r att alloc pods <<<"$(leaks "$n")"
	check "node $n after the rollout: attachments, allocations = pods off the host network" "$pods $pods" "$att $alloc"
done

# --- gVisor pods on shared-memory links (when the node image has runsc) --------
if [ "$(docker exec "$W1" cat /kind/shm-cni-runtimes 2>/dev/null)" = runsc-shm ]; then
	say "gVisor pods on shared-memory links: g1 on $W1, g2 on $W2 (RuntimeClass gvisor, handler runsc-shm)"
	{
		printf -- '---\napiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: gvisor}\nhandler: runsc-shm\n'
		pod g1 "$W1" gvisor
		pod g2 "$W2" gvisor
	} >"$ENGINE_STATE/gvisor.yaml"
	kubectl_ apply -f "$ENGINE_STATE/gvisor.yaml" >/dev/null
	if kubectl_ -n "$NS" wait --for=condition=Ready pod/g1 pod/g2 --timeout="$TIMEOUT" >/dev/null; then
		for p in g1 g2; do IP[$p]=$(kubectl_ -n "$NS" get pod "$p" -o jsonpath='{.status.podIP}'); done
		for p in g1:"$W1" g2:"$W2"; do
			n=${p#*:} p=${p%%:*}
			check "pod $p runs in gVisor" yes "$(in_pod "$p" dmesg | grep -q 'Starting gVisor' && echo yes)"
			check "agent on $n: pod $p's shared-memory link is up" 1 \
				"$(docker exec "$n" curl -fsS --max-time 5 http://127.0.0.1:9309/metrics | awk -v p="pod=\"$p\"" '/^shm_cni_link_up\{/ && index($0, p) && /kind="shm"/ {print $NF}')"
		done
		for pair in g1:g2 g2:g1 g1:a c:g1; do
			from=${pair%:*} to=${pair#*:}
			check "gVisor: pod $from -> pod $to, $to sees $from's own address" "${IP[$from]}" "$(clientip "$from" "${IP[$to]}")"
		done
		for pair in g2:g1 g1:g2 a:g2; do
			from=${pair%:*} to=${pair#*:}
			check "gVisor: pod $from fetches 4 MiB from pod $to, MD5 as at $to" "$(md5_of "$to")" "$(fetch_md5 "$from" "${IP[$to]}")"
		done
	else
		fail "gVisor pods Ready: $(kubectl_ -n "$NS" get pods g1 g2 -o wide 2>&1 | tail -2 | tr '\n' ' ')"
	fi
	kubectl_ delete -f "$ENGINE_STATE/gvisor.yaml" --wait --timeout=120s >/dev/null || fail "delete the gVisor pods"
fi

# --- Kubernetes' own network conformance tests ---------------------------------
if [ "${E2E:-0}" = 1 ]; then
	test/e2e/kind/conformance.sh || fail "[sig-network] [Conformance] (see above)"
fi
