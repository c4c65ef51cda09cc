#!/usr/bin/env bash
# cri-deps.sh installs what the container-runtime tiers (test/e2e/cri) need,
# only what is missing, and builds the tools Debian lacks into bin/cri/,
# where later runs find them:
#
#   hack/cri-deps.sh          tier 1: containerd 1.6, runc, the reference
#                             loopback plugin and busybox-static (Debian);
#                             crictl (sigs.k8s.io/cri-tools, module proxy)
#   hack/cri-deps.sh runsc    tier 2 besides: runsc and containerd-shim-runsc-v1
#                             built from gvisor.dev/gvisor with the patch
#                             series hack/runsc/*.patch, containerd v2
#                             (module proxy)
#   hack/cri-deps.sh k8s      tier 3 besides: etcd, openssl, nftables (Debian),
#                             kube-apiserver, kube-controller-manager,
#                             kube-scheduler, kubelet, kubectl, kube-proxy built from
#                             k8s.io/kubernetes (module proxy) into bin/cri/k8s
#   hack/cri-deps.sh kind     the kind tier (test/e2e/kind): docker.io and
#                             debootstrap (Debian), containerd v2, the tier 3
#                             binaries and kubeadm, agnhost and
#                             etcd (its server at the version k8s.io/kubernetes
#                             pins) built from the same source, CoreDNS
#                             (github.com/coredns/coredns), kind
#                             (sigs.k8s.io/kind at the version of go.mod) and
#                             the reference plugins loopback, host-local and
#                             portmap (containernetworking/plugins, go.mod's)
#   hack/cri-deps.sh e2e      e2e.test, Kubernetes' end-to-end test binary,
#                             built from the same k8s.io/kubernetes
#
# Versions: CRICTL_VERSION, GVISOR_VERSION (default: the gVisor of go.mod),
# CONTAINERD2_VERSION, KUBE_VERSION, COREDNS_VERSION (default: the one
# kubeadm deploys), KIND_VERSION (default: go.mod's). A binary is rebuilt when its version
# stamp differs (for runsc and its shim: the gVisor version and a hash of
# the patch series).
set -euo pipefail
cd "$(dirname "$0")/.."

CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}
CONTAINERD2_VERSION=${CONTAINERD2_VERSION:-v2.4.2}
KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.6}
KIND_VERSION=${KIND_VERSION:-$(go list -m -f '{{.Version}}' sigs.k8s.io/kind)}
GVISOR_VERSION=${GVISOR_VERSION:-$(go list -m -f '{{.Version}}' gvisor.dev/gvisor)}
OUT=$PWD/bin/cri
mkdir -p "$OUT"

log() { echo "cri-deps: $*" >&2; }

# stamped NAME VERSION: the binary NAME in $OUT was built at VERSION.
stamped() { [ -x "$OUT/$1" ] && [ "$(cat "$OUT/$1.version" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" >"$OUT/$1.version"; }

debian() {
	local pkgs=("$@")
	command -v containerd >/dev/null || pkgs+=(containerd)
	command -v runc >/dev/null || pkgs+=(runc)
	[ -x /usr/lib/cni/loopback ] || pkgs+=(containernetworking-plugins)
	[ -x /bin/busybox ] || pkgs+=(busybox-static)
	command -v ip >/dev/null || pkgs+=(iproute2)
	command -v iptables >/dev/null || pkgs+=(iptables) # HOST_FORWARD=drop
	[ ${#pkgs[@]} -eq 0 ] && return
	if [ "$(id -u)" -ne 0 ]; then
		log "missing packages ${pkgs[*]}: run as root to install them"
		exit 1
	fi
	log "installing ${pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

crictl() {
	stamped crictl "$CRICTL_VERSION" && return
	log "building crictl $CRICTL_VERSION"
	GOBIN=$OUT CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install \
		-ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
		"sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
	stamp crictl "$CRICTL_VERSION"
}

# gvisor builds runsc and the runsc shim in a scratch module, from a copy
# of the pinned gVisor module source with the patch series hack/runsc/*.patch
# applied in order (see hack/runsc/README.md): the shim tolerates EPERM on
# oom_score_adj, and runsc --sharedmem-links drives shm-cni's shared-memory
# links. A patch that does not apply stops the build.
gvisor() {
	local series=(hack/runsc/[0-9][0-9][0-9][0-9]-*.patch) version work src p
	version="$GVISOR_VERSION+$(cat "${series[@]}" | sha256sum | cut -c1-16)"
	if stamped runsc "$version" && stamped containerd-shim-runsc-v1 "$version"; then
		return
	fi
	work=$(mktemp -d)
	trap 'rm -rf "$work"' RETURN
	log "building runsc and containerd-shim-runsc-v1 $version (several minutes)"
	go mod download gvisor.dev/gvisor@"$GVISOR_VERSION"
	src=$(go list -m -f '{{.Dir}}' gvisor.dev/gvisor@"$GVISOR_VERSION")
	cp -r "$src" "$work/gvisor"
	chmod -R u+w "$work/gvisor"
	# Its own repository, so that git apply resolves the patches' paths
	# against the copy, wherever the scratch directory is.
	git -C "$work/gvisor" init -q
	for p in "${series[@]}"; do
		if ! git -C "$work/gvisor" apply "$PWD/$p"; then
			log "the patch $p does not apply to gvisor.dev/gvisor@$GVISOR_VERSION"
			exit 1
		fi
	done
	mkdir "$work/m"
	(
		cd "$work/m"
		printf 'module shmcni.test/gvisorbuild\n\ngo 1.26\n\nrequire gvisor.dev/gvisor %s\n\nreplace gvisor.dev/gvisor => ../gvisor\n' "$GVISOR_VERSION" >go.mod
		printf 'package main\n\nfunc main() {}\n' >main.go
		go get gvisor.dev/gvisor/runsc gvisor.dev/gvisor/shim
		CGO_ENABLED=0 go build -o "$OUT/runsc" gvisor.dev/gvisor/runsc
		CGO_ENABLED=0 go build -o "$OUT/containerd-shim-runsc-v1" gvisor.dev/gvisor/shim
	)
	stamp runsc "$version"
	stamp containerd-shim-runsc-v1 "$version"
}

containerd2() {
	stamped containerd2/containerd "$CONTAINERD2_VERSION" && return
	log "building containerd $CONTAINERD2_VERSION (several minutes)"
	mkdir -p "$OUT/containerd2"
	GOBIN=$OUT/containerd2 CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install \
		-tags "no_btrfs no_devmapper no_zfs" \
		-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD2_VERSION"
	stamp containerd2/containerd "$CONTAINERD2_VERSION"
}

# K8S_TIER3 are the Kubernetes commands tier 3 runs; K8S_KIND those a kind
# node image adds. Each is a package of k8s.io/kubernetes, built to
# bin/cri/k8s/<base name>; etcd is the scratch module's own main package
# (etcd's server, at the version k8s.io/kubernetes pins, as kubeadm expects).
K8S_TIER3=(cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl cmd/kube-proxy)
K8S_KIND=(cmd/kubeadm test/images/agnhost etcd)

# k8s PKG... builds Kubernetes commands through a scratch module requiring
# k8s.io/kubernetes: its go.mod pins the staging modules (k8s.io/api, ...)
# at v0.0.0, so each is replaced by its published v0.MINOR.PATCH. The
# pseudo-package e2e.test is the end-to-end test binary (go test -c).
k8s() {
	local c all=1
	for c in "$@"; do
		stamped "k8s/${c##*/}" "$KUBE_VERSION" || all=0
	done
	[ "$all" = 1 ] && return
	local work kmod ldf pkgs=()
	work=$(mktemp -d)
	trap 'rm -rf "$work"' RETURN
	log "building Kubernetes $KUBE_VERSION: $* (about 15 minutes on two cores for tier 3's, 4 GB of build cache)"
	mkdir -p "$OUT/k8s"
	kmod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
	{
		printf 'module shmcni.test/k8sbuild\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
		grep -E '^\s+k8s.io/\S+ v0.0.0$' "$kmod" | awk -v v="v0.${KUBE_VERSION#v1.}" '{print "\t" $1 " => " $1 " " v}'
		printf ')\n'
	} >"$work/go.mod"
	printf 'package main\n\nfunc main() {}\n' >"$work/main.go"
	mkdir "$work/etcd"
	printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' >"$work/etcd/main.go"
	ldf="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1"
	ldf+=" -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
	ldf+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
	for c in "$@"; do
		case $c in
		etcd) pkgs+=("go.etcd.io/etcd/server/v3/etcdmain@$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$kmod")") ;;
		e2e.test) pkgs+=(-t "k8s.io/kubernetes/test/e2e@$KUBE_VERSION") ;;
		*) pkgs+=("k8s.io/kubernetes/$c@$KUBE_VERSION") ;;
		esac
	done
	(
		cd "$work"
		go get "${pkgs[@]}"
		for c in "$@"; do
			stamped "k8s/${c##*/}" "$KUBE_VERSION" && continue
			log "building ${c##*/}"
			case $c in
			etcd) CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT/k8s/etcd" ./etcd ;;
			e2e.test) CGO_ENABLED=0 go test -c -ldflags "$ldf" -o "$OUT/k8s/e2e.test" k8s.io/kubernetes/test/e2e ;;
			*) CGO_ENABLED=0 go build -ldflags "$ldf" -o "$OUT/k8s/${c##*/}" "k8s.io/kubernetes/$c" ;;
			esac
			stamp "k8s/${c##*/}" "$KUBE_VERSION"
		done
	)
}

# coredns builds CoreDNS (its own main: coremain with every plugin) in a
# scratch module.
coredns() {
	stamped k8s/coredns "$COREDNS_VERSION" && return
	local work
	work=$(mktemp -d)
	trap 'rm -rf "$work"' RETURN
	log "building CoreDNS $COREDNS_VERSION"
	printf 'module shmcni.test/corednsbuild\n\ngo 1.26\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" >"$work/go.mod"
	printf 'package main\n\nimport (\n\t_ "github.com/coredns/coredns/core/plugin"\n\t"github.com/coredns/coredns/coremain"\n)\n\nfunc main() { coremain.Run() }\n' >"$work/main.go"
	(
		cd "$work"
		go mod tidy >/dev/null
		CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT/k8s/coredns" .
	)
	stamp k8s/coredns "$COREDNS_VERSION"
}

# cni_plugins builds the reference plugins a kind node carries (loopback,
# host-local, portmap) at the version of go.mod: Debian's speak CNI 1.0.0 at
# most, and containerd asks a 1.1.0 conflist's every plugin for STATUS.
cni_plugins() {
	local v p
	v=$(go list -m -f '{{.Version}}' github.com/containernetworking/plugins)
	for p in main/loopback ipam/host-local meta/portmap; do
		stamped "cni/${p##*/}" "$v" && continue
		log "building the CNI plugin ${p##*/} $v"
		mkdir -p "$OUT/cni"
		GOBIN=$OUT/cni CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install -trimpath -ldflags "-s -w" \
			"github.com/containernetworking/plugins/plugins/$p@$v"
		stamp "cni/${p##*/}" "$v"
	done
}

kind_() {
	stamped kind "$KIND_VERSION" && return
	log "building kind $KIND_VERSION"
	GOBIN=$OUT CGO_ENABLED=0 go install "sigs.k8s.io/kind@$KIND_VERSION"
	stamp kind "$KIND_VERSION"
}

case "${1:-}" in
"")
	debian
	crictl
	;;
runsc)
	debian
	crictl
	gvisor
	containerd2
	;;
k8s)
	pkgs=()
	command -v etcd >/dev/null || pkgs+=(etcd-server etcd-client)
	command -v openssl >/dev/null || pkgs+=(openssl)
	command -v nft >/dev/null || pkgs+=(nftables)
	debian "${pkgs[@]}"
	crictl
	k8s "${K8S_TIER3[@]}"
	;;
kind)
	pkgs=()
	command -v dockerd >/dev/null || pkgs+=(docker.io)
	command -v debootstrap >/dev/null || pkgs+=(debootstrap)
	debian "${pkgs[@]}"
	containerd2
	kind_
	cni_plugins
	k8s "${K8S_TIER3[@]}" "${K8S_KIND[@]}"
	coredns
	;;
e2e)
	k8s e2e.test
	;;
*)
	log "unknown tier ${1}: want nothing, runsc, k8s, kind or e2e"
	exit 2
	;;
esac
