#!/usr/bin/env bash
# kind-node-image.sh (make kind-node-image) assembles a kind node image
# without a registry, as kind's own images/base Dockerfile and
# `kind build node-image` would, from sources this machine reaches:
#
#   - a Debian root filesystem (debootstrap --variant=minbase) with the
#     packages kind's base image installs (systemd, iptables, nftables,
#     conntrack, ...), and runc;
#   - the files kind's base image carries (images/base/files of the kind
#     module: entrypoint, containerd config, kubelet units, sysctl.d) and
#     the steps of its Dockerfile (units enabled and masked, cri-base.json);
#   - containerd v2, ctr, crictl and kubeadm, kubelet, kubectl built by
#     hack/cri-deps.sh kind; and, when tier 2's builds are there
#     (hack/cri-deps.sh runsc), runsc and its shim with the patch series
#     hack/runsc, as the containerd runtime handler runsc-shm: the README's
#     recipe for gVisor pods on shared-memory links (runsc
#     --sharedmem-links, the conflist the agent writes with kind shm);
#   - the images kubeadm and the tests need, made by test/e2e/kind/mkimages
#     from binaries built here (and a second, smaller Debian root filesystem
#     for the images that need tools: kube-proxy's iptables and nft,
#     agnhost's curl, dig and nc), preloaded into the node's containerd
#     under the exact names kubeadm and e2e.test ask for.
#
# The result is a docker-archive, bin/kind/node-<key>.tar, for `docker
# load` (test/e2e/kind/run.sh does it), and bin/kind/node-image, the image's
# name (shm-cni.test/kind-node:<key>). The key hashes
# every input, so a second run with the same inputs does nothing; the
# Debian root filesystems are cached by their package lists.
#
# Needs root (debootstrap, chroot, the preloading containerd). No Docker
# engine: the preloading containerd runs on the host in its own mount
# namespace, its root inside the image's /var/lib/containerd, and no CRI.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$REPO/bin/kind
CRI=$REPO/bin/cri
K8S=$CRI/k8s
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The packages of kind's base image (less nfs, iscsi and fuse-overlayfs,
# which this tier does not use) and runc.
NODE_PKGS=(systemd conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz
	e2fsprogs bash ca-certificates curl jq procps runc)
# What agnhost's image installs (alpine's bind-tools curl netcat-openbsd
# iproute2 iperf bash util-linux-misc socat), and kube-proxy's iptables, nft
# and conntrack; with CoreDNS it is also glibc-dns-testing (Debian's
# dnsutils and CoreDNS).
TOOLS_PKGS=(bind9-dnsutils curl netcat-openbsd iproute2 iperf bash util-linux socat procps
	iptables nftables conntrack ca-certificates)
# The e2e nginx image: Debian's nginx.
NGINX_PKGS=(nginx-light)
KUBE_VERSION=$(cat "$K8S/kubeadm.version")

log() { echo "kind-node-image: $*" >&2; }
die() {
	log "$*"
	exit 1
}
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts)"
mkdir -p "$OUT"

# rootfs NAME PKG...: a debootstrapped root filesystem as a tarball, cached
# by suite, mirror and package list; prints its path.
rootfs() {
	local name=$1 key dir tarf
	shift
	key=$(printf '%s\n' "$SUITE" "$MIRROR" "$@" | sha256sum | cut -c1-12)
	tarf=$OUT/rootfs-$name-$key.tar
	if [ ! -f "$tarf" ]; then
		log "debootstrap $SUITE ($name: $*), about two minutes"
		dir=$(mktemp -d "$OUT/rootfs.XXXXXX")
		debootstrap --variant=minbase --include="$(
			IFS=,
			echo "$*"
		)" "$SUITE" "$dir" "$MIRROR" >"$OUT/debootstrap-$name.log" 2>&1 ||
			die "debootstrap failed: $(tail -3 "$OUT/debootstrap-$name.log")"
		rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/*.log
		if [ "$name" = tools ]; then
			# agnhost's user and group for the SupplementalGroups tests.
			chroot "$dir" groupadd -g 50000 group-defined-in-image
			chroot "$dir" useradd -u 1000 -G group-defined-in-image user-defined-in-image
		fi
		tar --numeric-owner --xattrs --xattrs-include='*' -C "$dir" -cf "$tarf.tmp" .
		mv "$tarf.tmp" "$tarf"
		rm -rf "$dir"
		find "$OUT" -maxdepth 1 -name "rootfs-$name-*.tar*" ! -name "${tarf##*/}" -delete
	fi
	echo "$tarf"
}

NODE_ROOTFS=$(rootfs node "${NODE_PKGS[@]}")
TOOLS_ROOTFS=$(rootfs tools "${TOOLS_PKGS[@]}")
NGINX_ROOTFS=$(rootfs nginx "${NGINX_PKGS[@]}")
for b in containerd2/containerd containerd2/ctr containerd2/containerd-shim-runc-v2 crictl \
	k8s/kubeadm k8s/kubelet k8s/kubectl k8s/kube-apiserver k8s/kube-controller-manager k8s/kube-scheduler \
	k8s/kube-proxy k8s/etcd k8s/coredns k8s/agnhost cni/loopback cni/host-local cni/portmap; do
	[ -x "$CRI/$b" ] || die "no $CRI/$b: run hack/cri-deps.sh kind"
done
KIND_SRC=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kind)
[ -d "$KIND_SRC/images/base/files" ] || die "no images/base/files in $KIND_SRC"
PAUSE_VERSION=$("$K8S/kubeadm" config images list --kubernetes-version "$KUBE_VERSION" 2>/dev/null | sed -n 's#.*/pause:##p')
ETCD_TAG=$("$K8S/kubeadm" config images list --kubernetes-version "$KUBE_VERSION" 2>/dev/null | sed -n 's#.*/etcd:##p')
COREDNS_TAG=$("$K8S/kubeadm" config images list --kubernetes-version "$KUBE_VERSION" 2>/dev/null | sed -n 's#.*/coredns:##p')
if [ -z "$PAUSE_VERSION" ] || [ -z "$ETCD_TAG" ] || [ -z "$COREDNS_TAG" ]; then
	die "kubeadm config images list: no pause, etcd or coredns"
fi
# The sandbox image kind's containerd config names.
KIND_PAUSE=$(sed -n 's/.*sandbox_image = "\(.*\)"/\1/p' "$KIND_SRC/images/base/files/etc/containerd/config.toml")
# The e2e images (test/utils/image/manifest.go of the same Kubernetes).
KSRC=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
e2e_tag() { sed -n "s#.*configs\[$1\] = Config{list\.[A-Za-z0-9]*, \"\([^\"]*\)\", \"\([^\"]*\)\"}.*#\1:\2#p" "$KSRC/test/utils/image/manifest.go"; }
AGNHOST=registry.k8s.io/e2e-test-images/$(e2e_tag Agnhost)
AGNHOST_PREV=registry.k8s.io/e2e-test-images/$(e2e_tag AgnhostPrev)
BUSYBOX=registry.k8s.io/e2e-test-images/$(e2e_tag BusyBox)
GLIBC_DNS=registry.k8s.io/e2e-test-images/$(e2e_tag GlibcDnsTesting)
NGINX=registry.k8s.io/e2e-test-images/$(e2e_tag Nginx)
NGINX_NEW=registry.k8s.io/e2e-test-images/$(e2e_tag NginxNew)
if [ "$AGNHOST" = registry.k8s.io/e2e-test-images/ ] || [ "$BUSYBOX" = registry.k8s.io/e2e-test-images/ ]; then
	die "no agnhost or busybox in the e2e image manifest"
fi

# The images, as mkimages reads them.
W=$(mktemp -d "$OUT/work.XXXXXX")
cleanup() {
	local p
	p=$(cat "$W/containerd.pid" 2>/dev/null || true)
	if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
		kill "$p"
		while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
	fi
	rm -rf "$W"
}
trap cleanup EXIT
# The tools in a fixed place: the spec names them, and the key hashes the spec.
mkdir -p "$OUT/bin"
(cd "$REPO" && CGO_ENABLED=0 go build -trimpath -o "$OUT/bin/" ./test/e2e/kind/mkimages ./test/e2e/cri/pause)
busybox_links=()
for a in $(/bin/busybox --list); do
	[ "$a" = busybox ] || busybox_links+=("\"/bin/$a=busybox\"")
done
A=$KSRC/test/images/agnhost
bin_image() { # bin_image TAG BINARY: a static binary under /usr/local/bin
	printf '{"tags": ["%s"], "layers": [{"files": ["%s:/usr/local/bin/%s"], "dirs": ["/tmp", "/etc"]}]}' "$1" "$2" "${2##*/}"
}
{
	echo '['
	for c in kube-apiserver kube-controller-manager kube-scheduler; do
		bin_image "registry.k8s.io/$c:$KUBE_VERSION" "$K8S/$c"
		echo ','
	done
	bin_image "registry.k8s.io/etcd:$ETCD_TAG" "$K8S/etcd"
	echo ','
	cat <<EOF
{"tags": ["registry.k8s.io/kube-proxy:$KUBE_VERSION"],
 "layers": [{"tar": "$TOOLS_ROOTFS"}, {"files": ["$K8S/kube-proxy:/usr/local/bin/kube-proxy"]}]},
{"tags": ["registry.k8s.io/coredns/coredns:$COREDNS_TAG"],
 "layers": [{"files": ["$K8S/coredns:/coredns"], "dirs": ["/tmp", "/etc"]}], "entrypoint": ["/coredns"]},
{"tags": ["registry.k8s.io/pause:$PAUSE_VERSION", "$KIND_PAUSE"],
 "layers": [{"files": ["$OUT/bin/pause:/pause"]}], "entrypoint": ["/pause"], "user": "65535:65535"},
{"tags": ["$AGNHOST", "$AGNHOST_PREV"],
 "layers": [{"tar": "$TOOLS_ROOTFS"},
            {"files": ["$K8S/agnhost:/agnhost", "$K8S/coredns:/coredns", "$A/porter/localhost.crt:/localhost.crt:0644", "$A/porter/localhost.key:/localhost.key:0644"],
             "symlinks": ["/agnhost-2=agnhost"], "dirs": ["/uploads"]}],
 "entrypoint": ["/agnhost"], "cmd": ["pause"]},
{"tags": ["$GLIBC_DNS"],
 "layers": [{"tar": "$TOOLS_ROOTFS"}, {"files": ["$K8S/coredns:/coredns"]}]},
{"tags": ["$NGINX", "$NGINX_NEW"],
 "layers": [{"tar": "$NGINX_ROOTFS"}], "cmd": ["nginx", "-g", "daemon off;"]},
{"tags": ["$BUSYBOX"],
 "layers": [{"files": ["/bin/busybox:/bin/busybox"], "dirs": ["/tmp", "/etc", "/root"],
             "symlinks": [$(IFS=,; echo "${busybox_links[*]}")]}],
 "cmd": ["sh"]}
]
EOF
} >"$W/images.json"

# The key: every input's content.
KEY=$(
	{
		sha256sum "$0" "$W/images.json" "$NODE_ROOTFS" "$TOOLS_ROOTFS" "$NGINX_ROOTFS" /bin/busybox \
			"$CRI"/containerd2/{containerd,ctr,containerd-shim-runc-v2} "$CRI/crictl" "$K8S"/{kubeadm,kubelet,kubectl} \
			"$K8S"/{kube-apiserver,kube-controller-manager,kube-scheduler,kube-proxy,etcd,coredns,agnhost} "$CRI"/cni/* \
			"$REPO"/test/e2e/kind/mkimages/*.go "$REPO"/test/e2e/cri/pause/*.go | cut -d' ' -f1
		cat "$CRI"/runsc.version "$CRI"/containerd-shim-runsc-v1.version 2>/dev/null
		(cd "$KIND_SRC/images/base/files" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
	} | sha256sum | cut -c1-12
)
NAME=shm-cni.test/kind-node:$KEY
# What the tier needs to know: the test images' names, and the tools root
# filesystem it imports as the image of its "outside" container.
TOOLS_KEY=${TOOLS_ROOTFS##*-}
cat >"$OUT/images.env" <<EOF
AGNHOST=$AGNHOST
BUSYBOX=$BUSYBOX
TOOLS_TAR=$TOOLS_ROOTFS
TOOLS_IMAGE=shm-cni.test/kind-tools:${TOOLS_KEY%.tar}
EOF
if [ -f "$OUT/node-$KEY.tar" ]; then
	echo "$NAME" >"$OUT/node-image"
	log "$NAME is up to date ($OUT/node-$KEY.tar)"
	exit 0
fi

log "images (mkimages)"
"$OUT/bin/mkimages" -spec "$W/images.json" -o "$W/images.tar"

log "node root filesystem"
R=$W/rootfs
mkdir "$R"
tar --numeric-owner --xattrs --xattrs-include='*' -C "$R" -xf "$NODE_ROOTFS"
F=$KIND_SRC/images/base/files
# images/base/Dockerfile: COPY ...
install -m 0755 -D -t "$R/usr/local/bin" "$F"/usr/local/bin/*
mkdir -p "$R/kind/bin" "$R/LICENSES" "$R/etc/containerd" "$R/etc/default" "$R/etc/sysctl.d" "$R/etc/systemd/system/kubelet.service.d"
install -m 0644 "$F/kind/README.txt" "$R/kind/"
install -m 0755 "$F"/kind/bin/* "$R/kind/bin/"
install -m 0644 "$F"/LICENSES/* "$R/LICENSES/"
install -m 0644 "$F/etc/crictl.yaml" "$R/etc/"
install -m 0644 "$F"/etc/containerd/* "$R/etc/containerd/"
# Where the machine withholds CAP_SYS_RESOURCE (ocicaps drops it from the
# nodes), runc cannot lower a pod's oom_score_adj below the node's and fails
# every sandbox ("can't get final child's PID from pipe"): containerd
# clamps the value instead, as for rootless nodes.
sed -i 's/^\( *restrict_oom_score_adj = \)false/\1true/' "$R/etc/containerd/config.toml"
grep -q '^ *restrict_oom_score_adj = true' "$R/etc/containerd/config.toml" || die "kind's containerd config has no restrict_oom_score_adj"
install -m 0644 "$F"/etc/default/* "$R/etc/default/"
install -m 0644 "$F"/etc/sysctl.d/* "$R/etc/sysctl.d/"
find "$F/etc/systemd/system" -maxdepth 1 -type f -exec install -m 0644 -t "$R/etc/systemd/system/" {} +
install -m 0644 "$F"/etc/systemd/system/kubelet.service.d/* "$R/etc/systemd/system/kubelet.service.d/"
chmod 755 "$R/kind" "$R/kind/bin"
# images/base/Dockerfile: RUN ... (the package cleanup and unit changes)
find "$R/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
rm -f "$R"/lib/systemd/system/multi-user.target.wants/* "$R"/etc/systemd/system/*.wants/* \
	"$R"/lib/systemd/system/local-fs.target.wants/* "$R"/lib/systemd/system/sockets.target.wants/*udev* \
	"$R"/lib/systemd/system/sockets.target.wants/*initctl* "$R"/lib/systemd/system/basic.target.wants/*
echo "ReadKMsg=no" >>"$R/etc/systemd/journald.conf"
ln -sf /usr/lib/systemd/systemd "$R/sbin/init"
systemctl --root="$R" enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
systemctl --root="$R" mask systemd-binfmt.service >/dev/null 2>&1
mkdir -p "$R/etc/kubernetes/manifests"
# The build stage: containerd, runc (Debian's, in /usr/sbin), crictl, the
# reference plugins, cri-base.json.
install -m 0755 "$CRI"/containerd2/{containerd,ctr,containerd-shim-runc-v2} "$CRI/crictl" "$R/usr/local/bin/"
"$CRI/containerd2/ctr" oci spec |
	chroot "$R" jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' |
	chroot "$R" jq 'del(.process.rlimits)' >"$R/etc/containerd/cri-base.json"
# The reference plugins kind's base image carries, built from the module
# proxy (hack/cri-deps.sh kind): loopback for a pod's lo, portmap for
# hostPort when a conflist chains it.
mkdir -p "$R/opt/cni/bin"
install -m 0755 "$CRI"/cni/{loopback,host-local,portmap} "$R/opt/cni/bin/"
# gVisor: the runtime handler runsc-shm (kind's containerd config is in
# the version 2 format, which containerd v2 migrates).
if [ -x "$CRI/runsc" ] && [ -x "$CRI/containerd-shim-runsc-v1" ]; then
	install -m 0755 "$CRI/runsc" "$CRI/containerd-shim-runsc-v1" "$R/usr/local/bin/"
	cat >>"$R/etc/containerd/config.toml" <<EOF

# shm-cni: gVisor pods on shared-memory links (the README's recipe).
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc-shm]
  runtime_type = "io.containerd.runsc.v1"
  cni_conf_dir = "/etc/cni/net.d-shm"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc-shm.options]
    TypeUrl = "io.containerd.runsc.v1.options"
    ConfigPath = "/etc/containerd/runsc-shm.toml"
EOF
	# ignore-cgroups: on a cgroup v1 host kind's entrypoint mounts the
	# kubelet's cgroup as each hierarchy's root, where runsc cannot place
	# itself (patch 0008 of hack/runsc extends the flag to subcontainers);
	# a runsc pod's resources are then not enforced by cgroups.
	cat >"$R/etc/containerd/runsc-shm.toml" <<EOF
[runsc_config]
  platform = "systrap"
  network = "sandbox"
  systemd-cgroup = "true"
  ignore-cgroups = "true"
  sharedmem-links = "true"
EOF
	echo runsc-shm >"$R/kind/shm-cni-runtimes"
fi
# kind build node-image: the Kubernetes binaries and version.
install -m 0755 "$K8S"/{kubeadm,kubelet,kubectl} "$R/usr/bin/"
echo "$KUBE_VERSION" >"$R/kind/version"

log "preloading the images into the node's containerd"
cat >"$W/containerd.toml" <<EOF
version = 3
root = "$R/var/lib/containerd"
state = "$W/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images",
  "io.containerd.nri.v1.nri", "io.containerd.podsandbox.controller.v1.podsandbox"]
[grpc]
  address = "$W/containerd.sock"
[ttrpc]
  address = "$W/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$W/opt"
EOF
# Its own mount namespace: the overlay mounts of unpacking never reach the
# host's.
unshare -m --propagation private "$CRI/containerd2/containerd" -c "$W/containerd.toml" >"$W/containerd.log" 2>&1 &
echo $! >"$W/containerd.pid"
for _ in $(seq 100); do
	"$CRI/containerd2/ctr" -a "$W/containerd.sock" version >/dev/null 2>&1 && break
	sleep 0.1
done
"$CRI/containerd2/ctr" -a "$W/containerd.sock" -n k8s.io images import --snapshotter overlayfs \
	"$W/images.tar" >"$W/import.log" 2>&1 || die "import: $(tail -5 "$W/import.log")"
"$CRI/containerd2/ctr" -a "$W/containerd.sock" -n k8s.io images ls -q | sort >"$W/images.list"
kill "$(cat "$W/containerd.pid")"
while kill -0 "$(cat "$W/containerd.pid")" 2>/dev/null; do sleep 0.1; done
rm -f "$W/containerd.pid"
log "preloaded: $(tr '\n' ' ' <"$W/images.list")"
for want in "registry.k8s.io/pause:$PAUSE_VERSION" "registry.k8s.io/etcd:$ETCD_TAG" "$AGNHOST" "$BUSYBOX" "$GLIBC_DNS" "$NGINX"; do
	grep -qxF "$want" "$W/images.list" || die "$want was not preloaded"
done

log "writing $OUT/node-$KEY.tar"
tar --numeric-owner --xattrs --xattrs-include='*' -C "$R" -cf "$W/rootfs.tar" .
rm -rf "$R"
# kind's node image config (images/base/Dockerfile): systemd as init, told
# to stop by SIGRTMIN+3.
cat >"$W/node.json" <<EOF
[{"tags": ["$NAME"], "layers": [{"tar": "$W/rootfs.tar", "stored": true}],
  "entrypoint": ["/usr/local/bin/entrypoint", "/sbin/init"], "env": ["container=docker"], "stopsignal": "SIGRTMIN+3"}]
EOF
"$OUT/bin/mkimages" -spec "$W/node.json" -o "$OUT/node-$KEY.tar.tmp"
mv "$OUT/node-$KEY.tar.tmp" "$OUT/node-$KEY.tar"
# Older node images go: each is a gigabyte or more.
find "$OUT" -maxdepth 1 -name 'node-*.tar' ! -name "node-$KEY.tar" -delete
echo "$NAME" >"$OUT/node-image"
log "$NAME: $(du -h "$OUT/node-$KEY.tar" | cut -f1)"
