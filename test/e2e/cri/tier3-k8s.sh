#!/usr/bin/env bash
# Tier 3 of the runtime tests (make e2e-k8s): a one-node Kubernetes whose pod
# network is shm-cni, installed the way users install it: the image from
# `make image` (bin/shm-cni-image.tar, shm-cni:dev) imported into containerd
# and deploy/shm-cni.yaml applied. etcd from Debian; kube-apiserver,
# kube-controller-manager (allocating node pod CIDRs), kube-scheduler,
# kubelet, kube-proxy (nftables mode) and kubectl built from
# k8s.io/kubernetes (hack/cri-deps.sh k8s, once: about 15 minutes and 4 GB
# of build cache); containerd v2 with runsc when tier 2's builds are in
# bin/cri, else Debian's containerd 1.6.
#
# The manifest is applied as shipped except where a test node on a shared
# machine must differ, each replacement checked: its host paths (CNI bin and
# conf dirs, /var/lib/shm-cni) and the conflist's log path point into the
# run's scratch directory, and the agent reaches the API
# server at 127.0.0.1:6443 (the API server listens on loopback only, and
# the kubernetes Service has no endpoint). The netns host path /var/run/netns becomes /run/netns,
# the same directory: containerd 1.6 does not resolve the /var/run symlink
# when it checks that a HostToContainer source is a shared or slave mount,
# and fails where "/" is a private mount, as here (containerd 2 resolves it).
# /run/shm-cni stays: a sandbox link's attach socket must have the same path
# in the agent's container and on the host, where runsc dials it (the run
# makes the directory, refuses to start where another agent has it, and
# removes it).
#
# Checks, each printed as PASS or FAIL:
#   - the node is NotReady (no pod network) until the agent is ready, then
#     Ready; the agent installed the CNI binaries (shm-cni, and portmap,
#     which the conflist chains: its pods have no hostPort, so it changes
#     nothing on this machine) and conflist;
#   - pods Running with addresses from the node's pod CIDR;
#   - pod <-> pod and host <-> pod TCP (the server sees the client), pod ->
#     outside masqueraded (the agent's cluster CIDRs from the ConfigMap);
#   - with runsc: a RuntimeClass gvisor whose handler is runsc-shm (the
#     README's recipe: runsc with --sharedmem-links reading the conflist the
#     agent writes with kind shm), its pod in gVisor on a shared-memory link
#     (no AF_PACKET socket, the agent's link up) talking to a runc pod and to
#     the host;
#   - ClusterIP Services through kube-proxy: a runc pod and the gvisor pod
#     reach one backed by a runc pod (4 MiB transfers, MD5), a runc pod one
#     backed by the gvisor pod;
#   - runc pods on TAP links (annotation shm-cni.io/kind: tap) and one on a
#     veth link (the manifest's default kind) talking to each other, the
#     host, the outside and a Service;
#   - NetworkPolicy, enforced by the agent from this API server: a
#     default-deny ingress policy on a runc pod on a TAP link and one on a
#     veth link stops the other pods' connections to them (the agent's
#     /policy names it, /metrics counts the denied packets) but not the
#     host's; a policy allowing one pod's label lets that pod in and no
#     other (the gvisor pod, the other runc pod); deleting them opens them
#     again;
#   - deleting the pods and the DaemonSet leaves no attachment, and the
#     agent's uplink goes with it; after the run the host's firewall is as
#     before it (kube-proxy's tables removed with kube-proxy --cleanup).
# Needs root. SHM_CNI_MANIFEST names another manifest than deploy/shm-cni.yaml.
set -euo pipefail
# shellcheck source=test/e2e/cri/lib.sh
. "$(dirname "$0")/lib.sh"

K8S_BIN=$CRI_BIN/k8s
MANIFEST=${SHM_CNI_MANIFEST:-$REPO/deploy/shm-cni.yaml}
IMAGE_ARCHIVE=$REPO/bin/shm-cni-image.tar
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
NODE=shm-cni-e2e
HOST_PORT=18080
# RUNSC=no forces Debian's containerd 1.6 even when tier 2's builds exist.
if [ "${RUNSC:-}" != no ] && [ -x "$CRI_BIN/runsc" ] && [ -x "$CRI_BIN/containerd2/containerd" ]; then
	RUNSC=yes
else
	RUNSC=no
fi

need_root
[ -f "$MANIFEST" ] || die "deploy/shm-cni.yaml is missing"
lock
sweep_stale
trap on_exit EXIT
trap 'exit 130' INT TERM

say "deps (Kubernetes: built once)"
"$REPO/hack/cri-deps.sh" k8s
# Tier 2's builds, rebuilt when stale (a changed hack/runsc series): the
# gvisor pod must run the runsc the tree describes.
[ "$RUNSC" = no ] || "$REPO/hack/cri-deps.sh" runsc
say "image (make image)"
make -C "$REPO" --no-print-directory image >/dev/null || die "make image"
[ -f "$IMAGE_ARCHIVE" ] || die "make image wrote no $IMAGE_ARCHIVE"
setup_scratch
[ -d /var/lib/kubelet ] || touch "$S/made-var-lib-kubelet"
compgen -G '/sys/fs/cgroup/*/kubepods' >/dev/null || compgen -G /sys/fs/cgroup/kubepods.slice >/dev/null || touch "$S/made-kubepods"
kube_chains() { { iptables-save; ip6tables-save; } 2>/dev/null | grep -c '^:KUBE-' || true; }
KUBE_CHAINS_BEFORE=$(kube_chains)
[ "$KUBE_CHAINS_BEFORE" -eq 0 ] && touch "$S/made-kube-chains"
# kube-proxy's and the kubelet's rules, and the agent's, must all go again:
# teardown_and_verify compares the host's firewall with this.
firewall_snapshot >"$S/firewall.before"
say "build ($S)"
build
rm -f "$S/cni/bin/shm-cni" "$S/cni/bin/portmap" # the agent installs them
# The outside namespace; making it also turns /run/netns into a shared
# mount, which the manifest's HostToContainer mount of /var/run/netns needs.
setup_outside
[ -e /run/shm-cni ] && die "/run/shm-cni exists: another shm-cni agent runs on this machine"
mkdir -p /run/shm-cni && touch "$S/made-run-shm-cni"
mkdir -p "$S/k8s"/{pki,logs,kubelet,pod-logs} "$S/etcd"
UPLINK=shm0 # the manifest's default

# --- containerd --------------------------------------------------------------
if [ "$RUNSC" = yes ]; then
	CTRD=$CRI_BIN/containerd2/containerd CTRCLI=$CRI_BIN/containerd2/ctr
	write_runsc_config "" ""
	write_containerd_config 2 false
	# The README's recipe for gVisor pods on shared-memory links: the
	# handler runsc-shm reads the conflist the agent writes with kind shm
	# (--cni-shm-conf-dir, host /etc/cni/net.d-shm in the manifest).
	shm_handler
else
	CTRD=$(command -v containerd) CTRCLI=$(command -v ctr)
	write_containerd_config 1 false
fi
# Pod netns stay in /var/run/netns (not under containerd's state): the
# manifest mounts that directory into the agent, which opens them.
write_conflist 1.0.0
rm -f "$S/cni/net.d/"* # the agent writes the conflist when it is ready
say "containerd ($("$CTRD" --version | awk '{print $3}'), runsc: $RUNSC)"
start_containerd "$CTRD" "$CTRCLI"
"$CTRCLI" -a "$S/containerd/containerd.sock" -n k8s.io images import "$IMAGE_ARCHIVE" >/dev/null || die "import $IMAGE_ARCHIVE"

# --- control plane -----------------------------------------------------------
say "PKI, etcd, control plane"
P=$S/k8s/pki
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$P/ca.key" -out "$P/ca.crt" -days 2 -subj /CN=shm-cni-e2e-ca 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' >"$P/apiserver.ext"
openssl req -newkey rsa:2048 -nodes -keyout "$P/apiserver.key" -out "$P/apiserver.csr" -subj /CN=kube-apiserver 2>/dev/null
openssl x509 -req -in "$P/apiserver.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial -out "$P/apiserver.crt" -days 2 -extfile "$P/apiserver.ext" 2>/dev/null
openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN,admin,admin,system:masters" >"$P/tokens.csv"
KUBECONFIG=$S/k8s/kubeconfig
cat >"$KUBECONFIG" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://127.0.0.1:6443", certificate-authority: $P/ca.crt}}]
users: [{name: admin, user: {token: "$TOKEN"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin}}]
current-context: e2e
EOF
kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG" "$@"; }
# pre_teardown (called by teardown): delete what was applied while the API
# server runs, so the agent stops gracefully (its nftables table goes with
# it); on failure, remove that table when the agent could not.
pre_teardown() {
	if ours "$(pid_of kube-apiserver)" && [ -f "$S/shm-cni.yaml" ]; then
		[ -f "$S/pods.yaml" ] && kubectl_ delete -f "$S/pods.yaml" --wait --timeout=60s >/dev/null 2>&1
		kubectl_ delete -f "$S/shm-cni.yaml" --wait --timeout=60s >/dev/null 2>&1
	fi
	for c in kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$(pid_of "$c")"; done
	# kube-proxy leaves its rules when it stops; --cleanup removes them.
	[ -f "$S/k8s/kube-proxy.yaml" ] && "$K8S_BIN/kube-proxy" --config="$S/k8s/kube-proxy.yaml" --cleanup >"$S/logs/kube-proxy-cleanup.log" 2>&1
	nft delete table inet shm-cni 2>/dev/null
	# The kubelet's own iptables chains (makeIPTablesUtilChains is off, but
	# its canary chains stay), when the machine had none before the run.
	if [ -f "$S/made-kube-chains" ]; then
		local ipt t ch
		for ipt in iptables ip6tables; do
			for t in filter nat mangle; do
				"$ipt" -t "$t" -S 2>/dev/null | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' |
					sed 's/^-A/-D/' | while read -r rule; do
					# shellcheck disable=SC2086 # the rule's words
					"$ipt" -t "$t" $rule 2>/dev/null
				done
				for ch in $("$ipt" -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
					"$ipt" -t "$t" -F "$ch" 2>/dev/null
					"$ipt" -t "$t" -X "$ch" 2>/dev/null
				done
			done
		done
	fi
	return 0
}

start_bg etcd /usr/bin/etcd --name e2e --data-dir "$S/etcd" \
	--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
	--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
	--initial-cluster e2e=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
start_bg kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
	--bind-address=127.0.0.1 --secure-port=6443 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
	--cert-dir="$S/k8s/apiserver-certs" --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
	--client-ca-file="$P/ca.crt" --token-auth-file="$P/tokens.csv" --authorization-mode=Node,RBAC --allow-privileged=true \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file="$P/sa.pub" \
	--service-account-signing-key-file="$P/sa.key" --service-cluster-ip-range="$SERVICE_CIDR"
for i in $(seq 240); do
	kubectl_ get --raw /readyz >/dev/null 2>&1 && break
	alive kube-apiserver || die "kube-apiserver exited: $(tail -5 "$S/logs/kube-apiserver.log")"
	sleep 0.5
done
kubectl_ get --raw /readyz >/dev/null 2>&1 || die "kube-apiserver is not ready after 120 s"
start_bg kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG" --bind-address=127.0.0.1 \
	--service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" --use-service-account-credentials=false \
	--leader-elect=false --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
	--service-cluster-ip-range="$SERVICE_CIDR"
start_bg kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$KUBECONFIG" --bind-address=127.0.0.1 --leader-elect=false
cat >"$S/k8s/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$S/containerd/containerd.sock
failCgroupV1: false
failSwapOn: false
resolvConf: /etc/resolv.conf
podLogsDir: $S/k8s/pod-logs
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
makeIPTablesUtilChains: false
EOF
say "kubelet"
start_bg kubelet "$K8S_BIN/kubelet" --config="$S/k8s/kubelet.yaml" --kubeconfig="$KUBECONFIG" \
	--root-dir="$S/k8s/kubelet" --cert-dir="$S/k8s/kubelet-pki" --hostname-override="$NODE"
for i in $(seq 120); do
	kubectl_ get node "$NODE" >/dev/null 2>&1 && break
	alive kubelet || die "kubelet exited: $(tail -5 "$S/logs/kubelet.log")"
	sleep 0.5
done
node_ready() { kubectl_ get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null; }
for i in $(seq 120); do
	[ -n "$(node_ready)" ] && break # the kubelet reported its first status
	sleep 0.5
done
check "node NotReady before shm-cni is installed" False "$(node_ready)"

# kube-proxy in its nftables mode (tables ip and ip6 kube-proxy), for the
# ClusterIP Services below. Conntrack limits 0: it leaves the host's
# conntrack sysctls as they are.
cat >"$S/k8s/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $KUBECONFIG}
hostnameOverride: $NODE
clusterCIDR: $CLUSTER_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
say "kube-proxy (nftables)"
start_bg kube-proxy "$K8S_BIN/kube-proxy" --config="$S/k8s/kube-proxy.yaml"
for c in kube-controller-manager kube-scheduler kubelet kube-proxy; do
	alive "$c" || die "$c exited: $(tail -3 "$S/logs/$c.log")"
done

# --- shm-cni -----------------------------------------------------------------
say "deploy/shm-cni.yaml"
sed -e "s#path: /opt/cni/bin#path: $S/cni/bin#" \
	-e "s#path: /etc/cni/net.d#path: $S/cni/net.d#" \
	-e "s#path: /var/lib/shm-cni#path: $S/state#" \
	-e "s#path: /var/run/netns\$#path: /run/netns#" \
	-e "s#\"logFile\": \"/var/log/shm-cni.log\"#\"logFile\": \"$S/logs/shm-cni.log\"#" \
	-e "s#^\\( *\\)env:\$#&\\n\\1  - {name: KUBERNETES_SERVICE_HOST, value: \"127.0.0.1\"}\\n\\1  - {name: KUBERNETES_SERVICE_PORT, value: \"6443\"}#" \
	"$MANIFEST" >"$S/shm-cni.yaml"
# containerd 1.6's libcni reads CNI 1.0.0 at most.
[ "$RUNSC" = yes ] || sed -i 's#"cniVersion": "1.1.0"#"cniVersion": "1.0.0"#' "$S/shm-cni.yaml"
for want in "path: /run/netns" "path: $S/cni/bin" "path: $S/cni/net.d" "path: /run/shm-cni" "path: $S/state" \
	"\"agentSocket\": \"/run/shm-cni/agent.sock\"" "\"logFile\": \"$S/logs/shm-cni.log\"" "KUBERNETES_SERVICE_HOST"; do
	grep -qF -- "$want" "$S/shm-cni.yaml" || die "the manifest changed: no place for $want (update tier3-k8s.sh)"
done
kubectl_ apply -f "$S/shm-cni.yaml" >/dev/null || die "apply the manifest"
kubectl_ -n shm-cni rollout status ds/shm-agent --timeout=180s >/dev/null || die "the agent DaemonSet is not ready: $(kubectl_ -n shm-cni get pods -o wide)"
AGENT_READY=$(http_get 127.0.0.1:9309 /readyz || true)
for i in $(seq 120); do
	[ "$(node_ready)" = True ] && break
	sleep 0.5
done
check "agent ready (its /readyz)" ok "$AGENT_READY"
check "node Ready once the agent is" True "$(node_ready)"
check "the agent installed the CNI binaries (shm-cni, portmap)" "yes yes" "$([ -x "$S/cni/bin/shm-cni" ] && echo yes) $([ -x "$S/cni/bin/portmap" ] && echo yes)"
check "the agent wrote the conflist" yes "$([ -f "$S/cni/net.d/10-shm-cni.conflist" ] && echo yes)"
check "the agent wrote the conflist with kind shm for the runsc-shm handler" 1 \
	"$(grep -c '"kind": "shm"' "$S/cni/net.d-shm/10-shm-cni.conflist" 2>/dev/null)"
NODE_CIDR=$(kubectl_ get node "$NODE" -o jsonpath='{.spec.podCIDR}')
GATEWAY=$(ip -4 -o addr show dev "$UPLINK" | awk '{print $4}' | cut -d/ -f1)
forward_on "$UPLINK" "$OUTSIDE_VETH" || fail "forwarding on $UPLINK, $OUTSIDE_VETH"
say "node pod CIDR $NODE_CIDR, uplink $UPLINK $GATEWAY"

# --- pods --------------------------------------------------------------------
say "pods"
{
	# web1 and web2 ask for TAP links (the agent forwards their packets);
	# web3 takes the manifest's default, a veth link (the host's kernel
	# forwards its packets).
	for p in web1 web2 web3; do
		ann=", annotations: {shm-cni.io/kind: tap}"
		[ "$p" = web3 ] && ann=
		cat <<EOF
---
apiVersion: v1
kind: Pod
metadata: {name: $p, namespace: default, labels: {app: $p}$ann}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1 # httpd as PID 1 ignores SIGTERM
  containers: [{name: serve, image: $IMAGE_BUSYBOX, imagePullPolicy: Never}]
EOF
	done
	if [ "$RUNSC" = yes ]; then
		cat <<EOF
---
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata: {name: gvisor}
handler: $SHM_HANDLER
---
apiVersion: v1
kind: Pod
metadata: {name: gvisor, namespace: default, labels: {app: gvisor}}
spec:
  runtimeClassName: gvisor
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers: [{name: serve, image: $IMAGE_BUSYBOX, imagePullPolicy: Never}]
EOF
	fi
	# ClusterIP Services, port 80 to the pods' 8080.
	for p in web2 $([ "$RUNSC" = yes ] && echo gvisor); do
		cat <<EOF
---
apiVersion: v1
kind: Service
metadata: {name: $p, namespace: default}
spec:
  selector: {app: $p}
  ports: [{port: 80, targetPort: 8080}]
EOF
	done
} >"$S/pods.yaml"
kubectl_ apply -f "$S/pods.yaml" >/dev/null || die "apply the pods"
kubectl_ wait --for=condition=Ready pod --all -n default --timeout=180s >/dev/null || fail "pods Ready: $(kubectl_ get pods -o wide)"
pods=(web1 web2 web3)
[ "$RUNSC" = yes ] && pods+=(gvisor)
for p in "${pods[@]}"; do
	IP[$p]=$(kubectl_ get pod "$p" -o jsonpath='{.status.podIP}')
	CTR[$p]=$(crictl_ ps -q --name serve --label "io.kubernetes.pod.name=$p" | head -1)
	check "pod $p Running" Running "$(kubectl_ get pod "$p" -o jsonpath='{.status.phase}')"
	in_cidr=$(awk -v ip="${IP[$p]}" -v net="${NODE_CIDR%.*/*}." 'BEGIN {print (index(ip, net) == 1) ? "yes" : "no"}')
	check "pod $p address ${IP[$p]} in the node's pod CIDR" yes "$in_cidr"
	wait_serving "${CTR[$p]}"
done
check "web1 -> web2 TCP, web2 sees web1" "${IP[web1]}" "$(in_pod "${CTR[web1]}" "$(peer_cmd "${IP[web2]}" 8080)")"
check "web2 -> web1 TCP, web1 sees web2" "${IP[web2]}" "$(in_pod "${CTR[web2]}" "$(peer_cmd "${IP[web1]}" 8080)")"
check "host -> web1 TCP, web1 sees the host's uplink address" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[web1]}" 8080)")"
start_host_server host "" "$GATEWAY" "$HOST_PORT"
check "web1 -> host TCP, the host sees web1" "${IP[web1]}" "$(in_pod "${CTR[web1]}" "$(peer_cmd "$GATEWAY" "$HOST_PORT")")"
start_host_server outside "$OUTSIDE_NS" "$OUTSIDE_PEER" 8080
check "web1 -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[web1]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"
check "agent: pods web1, web2 are on TAP links, up" "1 1" "$(for p in web1 web2; do http_get 127.0.0.1:9309 /metrics | awk -v p="pod=\"$p\"" '/^shm_cni_link_up\{/ && index($0, p) && /kind="tap"/ {print $NF}'; done | xargs)"
check "agent: pod web3 (the manifest's default kind) is on a veth link, up" 1 "$(http_get 127.0.0.1:9309 /metrics | awk '/^shm_cni_link_up\{/ && /pod="web3"/ && /kind="veth"/ {print $NF}')"
check "web1 -> web3 (veth) TCP, web3 sees web1" "${IP[web1]}" "$(in_pod "${CTR[web1]}" "$(peer_cmd "${IP[web3]}" 8080)")"
check "web3 -> web1 TCP, web1 sees web3" "${IP[web3]}" "$(in_pod "${CTR[web3]}" "$(peer_cmd "${IP[web1]}" 8080)")"
check "host -> web3 TCP, web3 sees the host's uplink address" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[web3]}" 8080)")"
check "web3 -> outside TCP, masqueraded to the host's address" "$OUTSIDE_HOST" "$(in_pod "${CTR[web3]}" "$(peer_cmd "$OUTSIDE_PEER" 8080)")"
if [ "$RUNSC" = yes ]; then
	check "pod gvisor runs in gVisor" 1 "$(in_pod "${CTR[gvisor]}" dmesg | grep -c 'Starting gVisor')"
	gns=$(crictl_ inspectp "$(crictl_ pods -q --name gvisor | head -1)" | grep -m1 '"NetNSPath"' | cut -d'"' -f4)
	check "pod gvisor: on a shared-memory link, no AF_PACKET socket in its netns" 0 "$(nsenter --net="$gns" cat /proc/net/packet | tail -n +2 | wc -l)"
	check "agent: pod gvisor's shm link is up" 1 "$(http_get 127.0.0.1:9309 /metrics | awk '/^shm_cni_link_up\{/ && /pod="gvisor"/ && /kind="shm"/ {print $NF}')"
	check "gvisor -> web1 TCP, web1 sees gvisor" "${IP[gvisor]}" "$(in_pod "${CTR[gvisor]}" "$(peer_cmd "${IP[web1]}" 8080)")"
	check "web1 -> gvisor TCP, gvisor sees web1" "${IP[web1]}" "$(in_pod "${CTR[web1]}" "$(peer_cmd "${IP[gvisor]}" 8080)")"
	check "host -> gvisor TCP" "$GATEWAY" "$(/bin/busybox sh -c "$(peer_cmd "${IP[gvisor]}" 8080)")"
fi

# --- ClusterIP Services through kube-proxy --------------------------------------
# kube-proxy DNATs in the host; the endpoint's reply must go back through
# the host to be un-DNATed: the agent's router sends it there (its hairpin
# table), so the endpoint sees the client's own address, which its
# NetworkPolicy judges.
svc_ip() { kubectl_ get svc "$1" -o jsonpath='{.spec.clusterIP}'; }
# in_pod_retry CTR CMD: CMD's output once it prints something (kube-proxy
# programs a new Service within a second or so).
in_pod_retry() {
	local out i
	for i in $(seq 40); do
		out=$(in_pod "$1" "$2" 2>/dev/null) && [ -n "$out" ] && break
		sleep 0.5
	done
	printf '%s' "$out"
}
check "kube-proxy programmed its nftables table" 1 "$(nft list tables | grep -c '^table ip kube-proxy$')"
SVC_WEB2=$(svc_ip web2)
check "web1 -> Service web2 ($SVC_WEB2:80), web2 sees web1" "${IP[web1]}" \
	"$(in_pod_retry "${CTR[web1]}" "$(peer_cmd "$SVC_WEB2" 80)")"
check "web1 <- Service web2 4 MiB, MD5" "$(in_pod "${CTR[web2]}" 'cat /www/blob.md5')" \
	"$(in_pod "${CTR[web1]}" "$(blob_cmd "$SVC_WEB2" 80)")"
check "web3 (veth) -> Service web2, web2 sees web3" "${IP[web3]}" "$(in_pod_retry "${CTR[web3]}" "$(peer_cmd "$SVC_WEB2" 80)")"
if [ "$RUNSC" = yes ]; then
	check "gvisor -> Service web2 (runc pod behind it), web2 sees gvisor" "${IP[gvisor]}" \
		"$(in_pod_retry "${CTR[gvisor]}" "$(peer_cmd "$SVC_WEB2" 80)")"
	check "gvisor <- Service web2 4 MiB, MD5" "$(in_pod "${CTR[web2]}" 'cat /www/blob.md5')" \
		"$(in_pod "${CTR[gvisor]}" "$(blob_cmd "$SVC_WEB2" 80)")"
	SVC_GVISOR=$(svc_ip gvisor)
	check "web1 -> Service gvisor ($SVC_GVISOR:80), gvisor sees web1" "${IP[web1]}" \
		"$(in_pod_retry "${CTR[web1]}" "$(peer_cmd "$SVC_GVISOR" 80)")"
fi

# --- NetworkPolicy -------------------------------------------------------------
# The agent enforces the cluster's NetworkPolicy (its informers, this API
# server) on web2, a TAP link's pod (the router judges every packet), and
# web3, a veth link's (the host queues the first packet of each connection
# to the router): a default-deny ingress policy on both stops new
# connections to them, but not the host's (kubelet probes); one allowing
# app=web1 lets web1 (and no other pod) in; deleting both opens them
# again. A change is waited for in the agent's /policy; a denied
# connection is one nc gives up on (3 s), the agent counting its packets.
say "NetworkPolicy"
sel="{matchExpressions: [{key: app, operator: In, values: [web2, web3]}]}"
for pol in deny allow; do
	if [ "$pol" = deny ]; then
		spec="{podSelector: $sel, policyTypes: [Ingress]}"
	else
		spec="{podSelector: $sel, ingress: [{from: [{podSelector: {matchLabels: {app: web1}}}]}]}"
	fi
	cat >"$S/netpol-$pol.yaml" <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: $pol-web, namespace: default}
spec: $spec
EOF
done
# ingress_of POD: the policies selecting POD for ingress in the agent's
# /policy, as a JSON list, or null.
ingress_of() {
	http_get 127.0.0.1:9309 "/policy?namespace=default&pod=$1" | tr -d ' \n' |
		grep -o '"ingress":\(null\|\[[^]]*\]\)' | cut -d: -f2
}
WANT_INGRESS=
ingress_is() { [ "$(ingress_of web2)" = "$WANT_INGRESS" ] && [ "$(ingress_of web3)" = "$WANT_INGRESS" ]; }
denied_of() {
	http_get 127.0.0.1:9309 /metrics |
		awk -v pod="pod=\"$1\"" '/^shm_cni_policy_denied_packets_total\{/ && index($0, pod) && /direction="ingress"/ {print $NF}'
}
# to_pod CTR POD: what POD's peer page says (the client's address) in
# brackets: "[]" when the connection did not open (and the pod ran nc).
to_pod() { in_pod "$1" "echo \"[\$(printf 'GET /cgi-bin/peer HTTP/1.0\r\n\r\n' | nc -w 3 ${IP[$2]} 8080 2>/dev/null | grep -o 'peer=.*' | cut -d= -f2)]\""; }
check "agent: no policy selects web2 or web3 yet" "null null" "$(ingress_of web2) $(ingress_of web3)"
kubectl_ apply -f "$S/netpol-deny.yaml" >/dev/null || fail "apply the deny policy"
WANT_INGRESS='["default/deny-web"]'
settle ingress_is || true
check "agent: /policy shows deny-web selecting web2 and web3" "$WANT_INGRESS $WANT_INGRESS" "$(ingress_of web2) $(ingress_of web3)"
for d in web2 web3; do
	check "web1 -> $d under default-deny ingress: no connection" "[]" "$(to_pod "${CTR[web1]}" "$d")"
	check "agent: $d's denied ingress packets counted" yes "$(awk -v n="$(denied_of "$d")" 'BEGIN {print (n > 0) ? "yes" : "no"}')"
	check "host -> $d under default-deny ingress (the node's traffic passes: kubelet probes)" "$GATEWAY" \
		"$(/bin/busybox sh -c "$(peer_cmd "${IP[$d]}" 8080)")"
	if [ "$RUNSC" = yes ]; then check "gvisor -> $d under default-deny ingress: no connection" "[]" "$(to_pod "${CTR[gvisor]}" "$d")"; fi
done
check "web3 (veth) -> web2 (tap) under default-deny ingress: no connection" "[]" "$(to_pod "${CTR[web3]}" web2)"
check "web2 (tap) -> web3 (veth) under default-deny ingress: no connection" "[]" "$(to_pod "${CTR[web2]}" web3)"
kubectl_ apply -f "$S/netpol-allow.yaml" >/dev/null || fail "apply the allow policy"
WANT_INGRESS='["default/allow-web","default/deny-web"]'
settle ingress_is || true
check "agent: /policy shows both policies selecting web2 and web3" "$WANT_INGRESS $WANT_INGRESS" "$(ingress_of web2) $(ingress_of web3)"
for d in web2 web3; do
	check "web1 -> $d allowed by app=web1, $d sees web1" "[${IP[web1]}]" "$(to_pod "${CTR[web1]}" "$d")"
	if [ "$RUNSC" = yes ]; then check "gvisor -> $d (not app=web1): no connection" "[]" "$(to_pod "${CTR[gvisor]}" "$d")"; fi
done
check "web2 -> web3 (not app=web1): no connection" "[]" "$(to_pod "${CTR[web2]}" web3)"
kubectl_ delete -f "$S/netpol-deny.yaml" -f "$S/netpol-allow.yaml" >/dev/null || fail "delete the policies"
WANT_INGRESS=null
settle ingress_is || true
check "agent: no policy selects web2 or web3 once deleted" "null null" "$(ingress_of web2) $(ingress_of web3)"
for d in web2 web3; do
	check "web1 -> $d once the policies are deleted" "[${IP[web1]}]" "$(to_pod "${CTR[web1]}" "$d")"
	if [ "$RUNSC" = yes ]; then check "gvisor -> $d once the policies are deleted" "[${IP[gvisor]}]" "$(to_pod "${CTR[gvisor]}" "$d")"; fi
done
check "web2 -> web3 once the policies are deleted" "[${IP[web2]}]" "$(to_pod "${CTR[web2]}" web3)"

# --- removal -----------------------------------------------------------------
say "delete the pods, then the DaemonSet"
kubectl_ delete -f "$S/pods.yaml" --wait --timeout=120s >/dev/null || fail "delete the pods"
check "agent: no attachment after the pods" 0 "$(http_get 127.0.0.1:9309 /attachments | grep -c '"containerID"')"
kubectl_ delete -f "$S/shm-cni.yaml" --wait --timeout=120s >/dev/null || fail "delete the manifest"
gone() { ! ip link show "$UPLINK" >/dev/null 2>&1; }
settle gone || true
check "the agent's uplink $UPLINK went with it" "" "$(ip -o link show "$UPLINK" 2>/dev/null)"

check "the agent removed its nftables table" "" "$(nft list table inet shm-cni 2>/dev/null)"
say "teardown"
teardown_and_verify
check "no iptables KUBE- chain added" "$KUBE_CHAINS_BEFORE" "$(kube_chains)"
finish "tier 3 (Kubernetes $(cat "$K8S_BIN/kubelet.version"), containerd, runsc: $RUNSC, shm-cni)"
