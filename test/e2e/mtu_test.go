package e2e

import (
	"fmt"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The MTU the agent gives sandbox links by default (its --shm-mtu), and the
// one of kernel pods' links and the uplink (--mtu).
const (
	shmMTU    = 65000
	kernelMTU = 1500
	// narrowMTU is the host's link to the outside in TestPathMTU.
	narrowMTU = 1400
)

// TestPathMTU: sandbox links carry large packets while kernel pods' links
// and the uplink keep 1500 bytes, each pod's link and CNI result say its
// MTU, and TCP finds every path's MTU over IPv4 and IPv6: between sandboxes
// (64 KiB segments), between a sandbox and a kernel pod or the host (the
// peers' MSS), and beyond the node over a host link narrower than the
// outside's MSS says, where the host answers the pods' packets with ICMP
// "fragmentation needed" or "packet too big" through the uplink and the
// router, and the sender's TCP (gVisor's in a sandbox, the kernel's in a
// kernel pod) sends smaller segments. Every transfer is verified.
func TestPathMTU(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	k1, _, s1, s2 := fourPods(t, ctx, n)
	for _, p := range []struct {
		pod  *node.Pod
		want int
	}{{k1, kernelMTU}, {s1, shmMTU}, {s2, shmMTU}} {
		if got := p.pod.Result.Interfaces[0].Mtu; got != p.want {
			t.Errorf("%s: the CNI result's MTU is %d, want %d", p.pod.Name, got, p.want)
		}
		if got, err := linkMTU(p.pod.NS, node.IfName); err != nil || got != p.want {
			t.Errorf("%s: %s's MTU in the pod is %d (%v), want %d", p.pod.Name, node.IfName, got, err, p.want)
		}
	}
	if err := n.Host.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(node.HostOutsideVeth)
		if err == nil {
			err = netlink.LinkSetMTU(l, narrowMTU)
		}
		return err
	}); err != nil {
		t.Fatalf("narrow the host's link to the outside: %v", err)
	}
	outside := n.OutsidePeer()
	for _, tc := range []struct {
		name     string
		src, dst *node.Peer
	}{
		{"sandbox-sandbox", n.PodPeer(s1), n.PodPeer(s2)},
		{"sandbox-kernel", n.PodPeer(s1), n.PodPeer(k1)},
		{"kernel-sandbox", n.PodPeer(k1), n.PodPeer(s2)},
		{"sandbox-host", n.PodPeer(s2), n.HostPeer()},
		{"host-sandbox", n.HostPeer(), n.PodPeer(s1)},
		{"sandbox-outside", n.PodPeer(s1), outside},
		{"kernel-outside", n.PodPeer(k1), outside},
	} {
		for _, v6 := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/%s", tc.name, map[bool]string{false: "IPv4", true: "IPv6"}[v6]), func(t *testing.T) {
				tr, err := n.Transfer(ctx, tc.src, tc.dst, v6, 8<<20)
				if err != nil {
					t.Fatal(err)
				}
				if got, want := tr.From, n.ExpectedSource(tc.src, tc.dst, v6); got != want {
					t.Errorf("the receiver saw source %s, want %s", got, want)
				}
			})
		}
	}
}

// linkMTU returns the MTU of the interface name in netns.
func linkMTU(netns ns.NetNS, name string) (int, error) {
	var mtu int
	err := netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		mtu = l.Attrs().MTU
		return nil
	})
	return mtu, err
}
