package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// refPlugins is the reference plugins' module, at the version go.mod pins.
const refPlugins = "github.com/containernetworking/plugins"

// buildRefPlugins builds ptp, bridge and host-local into dir, inside the
// plugins' own module (its go.sum, not ours) from the module cache, static
// as the plugins' releases are and with the flags shm-cni's own binaries
// get (node.ReleaseFlags): the CNI rows compare like with like.
func buildRefPlugins(ctx context.Context, dir string) error {
	src, err := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", refPlugins).Output()
	if err != nil {
		return fmt.Errorf("build reference plugins: locate %s: %w", refPlugins, err)
	}
	args := append([]string{"build", "-o", dir + string(filepath.Separator)}, node.ReleaseFlags...)
	cmd := exec.CommandContext(ctx, "go", append(args,
		"./plugins/main/ptp", "./plugins/main/bridge", "./plugins/ipam/host-local")...)
	cmd.Dir = strings.TrimSpace(string(src))
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "CGO_ENABLED=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build reference plugins: %w\n%s", err, out.Bytes())
	}
	return nil
}

// kend is a kernel-stack end: sockets in a namespace, reached at an
// address.
type kend struct {
	name string
	ns   ns.NetNS
	addr netip.Addr
}

// The reference networks. Disjoint from the shm-cni node's 10.244.0.0/16.
var (
	vethA = netip.MustParsePrefix("10.250.0.1/24")
	vethB = netip.MustParsePrefix("10.250.0.2/24")
	// ptpSubnet and bridgeSubnet are the reference plugins' host-local
	// ranges.
	ptpSubnet    = "10.251.0.0/16"
	bridgeSubnet = "10.252.0.0/16"
)

// newVethPair makes two namespaces joined by a veth pair with vethA and
// vethB: the kernel's own reference.
func (b *bench) newVethPair() (kend, kend, error) {
	a, err := b.newNS()
	if err != nil {
		return kend{}, kend{}, err
	}
	z, err := b.newNS()
	if err != nil {
		return kend{}, kend{}, err
	}
	err = a.Do(func(ns.NetNS) error {
		la := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "veth0", MTU: 1500}, PeerName: "veth1"}
		if err := netlink.LinkAdd(la); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		peer, err := netlink.LinkByName("veth1")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(peer, int(z.Fd())); err != nil {
			return fmt.Errorf("move veth: %w", err)
		}
		return linkUp("veth0", vethA)
	})
	if err == nil {
		err = z.Do(func(ns.NetNS) error { return linkUp("veth1", vethB) })
	}
	if err != nil {
		return kend{}, kend{}, fmt.Errorf("veth pair: %w", err)
	}
	return kend{"veth-a", a, vethA.Addr()}, kend{"veth-b", z, vethB.Addr()}, nil
}

func linkUp(name string, p netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	ipn := &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipn}); err != nil {
		return fmt.Errorf("address %s on %s: %w", p, name, err)
	}
	return netlink.LinkSetUp(l)
}

// refNet is a reference plugin's network: a conflist and the host
// namespace its plugins run in.
type refNet struct {
	name string
	host ns.NetNS
	cni  *libcni.CNIConfig
	list *libcni.NetworkConfigList
}

// refConflist returns a 1.0.0 conflist for plugin "ptp" or "bridge" (on
// the Linux bridge bridge) with host-local IPAM keeping its state in
// dataDir.
func refConflist(name, plugin, bridge, subnet, dataDir string) ([]byte, error) {
	p := map[string]any{
		"type":   plugin,
		"ipMasq": false,
		"mtu":    1500,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  [][]map[string]string{{{"subnet": subnet}}},
			"dataDir": dataDir,
		},
	}
	if plugin == "bridge" {
		p["bridge"] = bridge
		p["isGateway"] = true
	}
	return json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "bench-" + name, "plugins": []any{p}})
}

// newRefNet loads plugin's conflist (bridge: on the Linux bridge
// cnibench0); its plugins run in host.
func (b *bench) newRefNet(plugin, subnet string, host ns.NetNS) (*refNet, error) {
	return b.newNamedRefNet(plugin, plugin, "cnibench0", subnet, host)
}

// newNamedRefNet is newRefNet for a network called name, whose bridge
// plugin makes the Linux bridge bridge.
func (b *bench) newNamedRefNet(name, plugin, bridge, subnet string, host ns.NetNS) (*refNet, error) {
	conf, err := refConflist(name, plugin, bridge, subnet, filepath.Join(b.tmp, "ipam-"+name))
	if err != nil {
		return nil, err
	}
	l, err := libcni.ConfListFromBytes(conf)
	if err != nil {
		return nil, fmt.Errorf("conflist %s: %w", name, err)
	}
	return &refNet{name: name, host: host, list: l,
		cni: libcni.NewCNIConfigWithCacheDir([]string{b.refBin}, filepath.Join(b.tmp, "cache-"+name), nil)}, nil
}

// add runs ADD for a pod in netns x and returns its IPv4 address.
func (r *refNet) add(ctx context.Context, id string, x ns.NetNS) (netip.Addr, error) {
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: x.Path(), IfName: "eth0"}
	var res *types100.Result
	err := r.host.Do(func(ns.NetNS) error {
		raw, err := r.cni.AddNetworkList(ctx, r.list, rt)
		if err != nil {
			return err
		}
		res, err = types100.NewResultFromResult(raw)
		return err
	})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s ADD %s: %w", r.name, id, err)
	}
	for _, ip := range res.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok && a.Unmap().Is4() {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%s ADD %s: no IPv4 address in %v", r.name, id, res.IPs)
}

// del runs DEL for a pod.
func (r *refNet) del(ctx context.Context, id string, x ns.NetNS) error {
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: x.Path(), IfName: "eth0"}
	if err := r.host.Do(func(ns.NetNS) error { return r.cni.DelNetworkList(ctx, r.list, rt) }); err != nil {
		return fmt.Errorf("%s DEL %s: %w", r.name, id, err)
	}
	return nil
}

// newRefHost makes the reference plugins' host namespace, forwarding.
func (b *bench) newRefHost() (ns.NetNS, error) {
	h, err := b.newNS()
	if err != nil {
		return nil, err
	}
	if err := node.Sysctl(h, "net.ipv4.ip_forward", "1"); err != nil {
		return nil, err
	}
	return h, nil
}

// refPods adds two pods of r in fresh namespaces.
func (b *bench) refPods(ctx context.Context, r *refNet) (kend, kend, error) {
	var ends [2]kend
	for i := range ends {
		x, err := b.newNS()
		if err != nil {
			return kend{}, kend{}, err
		}
		a, err := r.add(ctx, fmt.Sprintf("bench-%s-%d", r.name, i), x)
		if err != nil {
			return kend{}, kend{}, err
		}
		ends[i] = kend{fmt.Sprintf("%s-%d", r.name, i), x, a}
	}
	return ends[0], ends[1], nil
}
