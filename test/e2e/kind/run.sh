#!/usr/bin/env bash
# Tier 5: shm-cni in a kind cluster (one control plane, two workers).
#
#   test/e2e/kind/run.sh          # from the repository root
#   KEEP=1 test/e2e/kind/run.sh   # leave the cluster up afterwards
#
# Needs docker, kind and kubectl, and pulls kind's node image and
# the agnhost test image. It builds the image archive (make image), creates
# the cluster (cluster.yaml: no default CNI), loads the archive onto the
# nodes, applies deploy/shm-cni.yaml, waits for the DaemonSet and every node
# Ready, then checks pod <-> pod across the two workers, a Service, host ->
# pod and pod -> host. It removes the cluster at the end unless KEEP=1.
set -euo pipefail

cd "$(dirname "$0")/../../.."
CLUSTER=${CLUSTER:-shm-cni}
ARCHIVE=${ARCHIVE:-bin/shm-cni-image.tar}
AGNHOST=${AGNHOST:-registry.k8s.io/e2e-test-images/agnhost:2.53}
NS=shm-cni-e2e
TIMEOUT=${TIMEOUT:-300s}

log() { printf '== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
for tool in docker kind kubectl make; do
	command -v "$tool" >/dev/null || fail "$tool not found"
done

cleanup() {
	local rc=$?
	if [ "$rc" -ne 0 ]; then
		log "diagnostics"
		kubectl get nodes -o wide || true
		kubectl -n shm-cni get pods -o wide || true
		kubectl -n shm-cni logs -l app.kubernetes.io/name=shm-agent --tail=50 --prefix || true
		kubectl -n "$NS" get pods -o wide || true
	fi
	if [ "${KEEP:-0}" = 1 ]; then
		log "keeping cluster $CLUSTER"
	else
		kind delete cluster --name "$CLUSTER" || true
	fi
	exit "$rc"
}

log "building the image archive"
make image IMAGE_ARCHIVE="$ARCHIVE"

log "creating cluster $CLUSTER"
trap cleanup EXIT
kind create cluster --name "$CLUSTER" --config test/e2e/kind/cluster.yaml --wait 0s
kind load image-archive "$ARCHIVE" --name "$CLUSTER"

log "deploying shm-cni"
kubectl apply -f deploy/shm-cni.yaml
kubectl -n shm-cni rollout status daemonset/shm-agent --timeout="$TIMEOUT"
kubectl wait --for=condition=Ready nodes --all --timeout="$TIMEOUT"

log "test pods on both workers"
read -r -a workers <<<"$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}')"
[ "${#workers[@]}" -ge 2 ] || fail "want two workers, have: ${workers[*]}"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
for i in 0 1; do
	kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: web-$i
  namespace: $NS
  labels: {app: web, idx: "$i"}
spec:
  nodeName: ${workers[$i]}
  containers:
    - name: agnhost
      image: $AGNHOST
      args: ["netexec", "--http-port=8080"]
      readinessProbe:
        httpGet: {path: /hostname, port: 8080}
EOF
done
kubectl apply -f - <<EOF
apiVersion: v1
kind: Service
metadata:
  name: web-0
  namespace: $NS
spec:
  selector: {app: web, idx: "0"}
  ports: [{port: 80, targetPort: 8080}]
EOF
kubectl -n "$NS" wait --for=condition=Ready pod/web-0 pod/web-1 --timeout="$TIMEOUT"

ip0=$(kubectl -n "$NS" get pod web-0 -o jsonpath='{.status.podIP}')
ip1=$(kubectl -n "$NS" get pod web-1 -o jsonpath='{.status.podIP}')
node0ip=$(kubectl get node "${workers[0]}" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
log "web-0 $ip0 on ${workers[0]} ($node0ip), web-1 $ip1 on ${workers[1]}"

# check NAME CMD...: runs CMD, which must succeed.
check() {
	local name=$1
	shift
	if "$@" >/dev/null; then
		log "ok   $name"
	else
		fail "$name"
	fi
}
check "pod web-0 -> pod web-1 across workers" kubectl -n "$NS" exec web-0 -- /agnhost connect --timeout=5s "$ip1:8080"
check "pod web-1 -> pod web-0 across workers" kubectl -n "$NS" exec web-1 -- /agnhost connect --timeout=5s "$ip0:8080"
check "pod web-1 -> service web-0" kubectl -n "$NS" exec web-1 -- /agnhost connect --timeout=5s "web-0.$NS.svc.cluster.local:80"
check "pod web-1 -> node ${workers[0]} (kubelet port)" kubectl -n "$NS" exec web-1 -- /agnhost connect --timeout=5s "$node0ip:10250"
# The kind node containers have curl; the host of web-0 and the other node.
check "host ${workers[0]} -> pod web-0" docker exec "${workers[0]}" curl -fsS --max-time 5 "http://$ip0:8080/hostname"
check "host ${workers[0]} -> pod web-1 (other node)" docker exec "${workers[0]}" curl -fsS --max-time 5 "http://$ip1:8080/hostname"
# web-1 sees web-0's own address (no masquerade inside the cluster): web-0
# dials web-1's /clientip (agnhost netexec /dial) on the host's request.
seen=$(docker exec "${workers[0]}" curl -fsS --max-time 10 \
	"http://$ip0:8080/dial?request=clientip&protocol=http&host=$ip1&port=8080&tries=1")
case "$seen" in
*"\"$ip0:"*) log "ok   web-1 sees web-0 as $ip0" ;;
*) fail "web-1 saw web-0 as: $seen (want $ip0)" ;;
esac
log "all checks passed"
