package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The two nodes' addressing: each its own pod CIDRs inside one cluster
// CIDR per family, and a link between the two hosts ("the node network").
var (
	nodeBPodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}
	clusterCIDRs  = "10.244.0.0/16,fd00:10:244::/48"
	// hostA and hostB are the hosts' addresses on the link between them,
	// IPv4 then IPv6.
	hostA = []netip.Prefix{netip.MustParsePrefix("198.51.100.1/24"), netip.MustParsePrefix("2001:db8:100::1/64")}
	hostB = []netip.Prefix{netip.MustParsePrefix("198.51.100.2/24"), netip.MustParsePrefix("2001:db8:100::2/64")}
)

// peerRoutes is the --peer-routes flag routing cidrs via the other host.
func peerRoutes(cidrs []netip.Prefix, via []netip.Prefix) string {
	var rs []string
	for i, p := range cidrs {
		rs = append(rs, p.String()+"="+via[i].Addr().String())
	}
	return "--peer-routes=" + strings.Join(rs, ",")
}

// TestTwoNodes is "two nodes on one machine": two agents, each in its own
// host netns with its own pod CIDRs, the hosts joined by a veth link and
// each agent routing the other's pod CIDRs via the other host
// (--peer-routes, the host-gw routes the agents keep from Node objects in
// a cluster). Kernel pods (on tap and veth links) and sandboxes on
// different nodes exchange verified TCP both ways over IPv4 and IPv6, and
// every receiver sees the sender's own pod address (no masquerade inside
// the cluster CIDRs); a host reaches a pod of the other node too.
func TestTwoNodes(t *testing.T) {
	a := newNode(t, node.Options{
		DeferAgent:     true,
		ExtraAgentArgs: []string{"--cluster-cidr=" + clusterCIDRs, peerRoutes(nodeBPodCIDRs, hostB)},
	})
	b := newNode(t, node.Options{
		DeferAgent:     true,
		PodCIDRs:       nodeBPodCIDRs,
		ExtraAgentArgs: []string{"--cluster-cidr=" + clusterCIDRs, peerRoutes(a.PodCIDRs(), hostA)},
	})
	if err := joinHosts(a.Host, b.Host); err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	for _, n := range []*node.Node{a, b} {
		if err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ka, sa := addPod(t, ctx, a, "ka", node.KindTap), addPod(t, ctx, a, "sa", node.KindShm)
	kb, sb := addPod(t, ctx, b, "kb", node.KindTap), addPod(t, ctx, b, "sb", node.KindShm)
	va, vb := addPod(t, ctx, a, "va", node.KindVeth), addPod(t, ctx, b, "vb", node.KindVeth)
	if a.PodCIDRs()[0].Contains(kb.Addr4) || !nodeBPodCIDRs[0].Contains(kb.Addr4) {
		t.Fatalf("pod kb got %s, not from node b's pod CIDR %s", kb.Addr4, nodeBPodCIDRs[0])
	}

	hostOf := map[*node.Node][]netip.Prefix{a: hostA, b: hostB}
	for _, tc := range []struct {
		name     string
		src, dst *node.Peer
		srcNode  *node.Node
	}{
		{"kernel a to kernel b", a.PodPeer(ka), b.PodPeer(kb), a},
		{"kernel b to kernel a", b.PodPeer(kb), a.PodPeer(ka), b},
		{"sandbox a to kernel b", a.PodPeer(sa), b.PodPeer(kb), a},
		{"kernel b to sandbox a", b.PodPeer(kb), a.PodPeer(sa), b},
		{"sandbox b to sandbox a", b.PodPeer(sb), a.PodPeer(sa), b},
		{"host b to kernel a", b.HostPeer(), a.PodPeer(ka), b},
		// A veth pod's traffic leaves and enters its node through the
		// host's routing alone.
		{"veth a to veth b", a.PodPeer(va), b.PodPeer(vb), a},
		{"veth b to kernel a", b.PodPeer(vb), a.PodPeer(ka), b},
		{"sandbox b to veth a", b.PodPeer(sb), a.PodPeer(va), b},
		{"host b to veth a", b.HostPeer(), a.PodPeer(va), b},
	} {
		for _, v6 := range []bool{false, true} {
			fam := map[bool]string{false: "IPv4", true: "IPv6"}[v6]
			t.Run(tc.name+"/"+fam, func(t *testing.T) {
				tr, err := tc.srcNode.Transfer(ctx, tc.src, tc.dst, v6, 1<<20)
				if err != nil {
					t.Fatal(err)
				}
				want := tc.src.Addr(v6)
				if tc.src.Kind == node.PeerHost {
					// The host's address toward the other node.
					i := 0
					if v6 {
						i = 1
					}
					want = hostOf[tc.srcNode][i].Addr()
				}
				if tr.From != want {
					t.Errorf("the receiver saw source %s, want %s", tr.From, want)
				}
			})
		}
	}
}

// joinHosts joins two host namespaces with a veth pair "node0" addressed
// hostA and hostB.
func joinHosts(a, b ns.NetNS) error {
	err := a.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: "node0"},
			PeerName:      "node0",
			PeerNamespace: netlink.NsFd(int(b.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth node0: %w", err)
		}
		return addrsUp("node0", hostA)
	})
	if err != nil {
		return err
	}
	return b.Do(func(ns.NetNS) error { return addrsUp("node0", hostB) })
}

// addrsUp adds addrs to the link name (no duplicate address detection)
// and sets it up.
func addrsUp(name string, addrs []netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	for _, p := range addrs {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(l, a); err != nil {
			return fmt.Errorf("add %s to %s: %w", p, name, err)
		}
	}
	return netlink.LinkSetUp(l)
}
