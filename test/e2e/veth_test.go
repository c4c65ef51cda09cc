package e2e

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// TestVethMatrix proves every path of kernel pods on veth links (kind
// veth), over IPv4 and IPv6, with a verified TCP transfer: veth pod <->
// veth pod (the host's kernel alone), veth pod <-> tap pod and <-> sandbox
// (through the host, the uplink and the router), host <-> veth pod, and
// each pod -> outside, masqueraded, where every receiver inside the node
// sees the sender's own address.
func TestVethMatrix(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	v1, v2 := addPod(t, ctx, n, "v1", node.KindVeth), addPod(t, ctx, n, "v2", node.KindVeth)
	k, s := addPod(t, ctx, n, "k", node.KindTap), addPod(t, ctx, n, "s", node.KindShm)
	matrix(t, ctx, n, v1, v2, k, s)
}

// TestVethAntiSpoof: a pod on a veth link that sends from another pod's
// address (here its neighbour's, which it puts on its own interface) is
// dropped by the host before anything sees it, in both families, while the
// same datagram from its own address arrives. UDP, so that nothing but the
// drop could keep the datagram from the receiver (a spoofed TCP SYN would
// fail anyway, its answer going to the real owner).
func TestVethAntiSpoof(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	v1, v2 := addPod(t, ctx, n, "v1", node.KindVeth), addPod(t, ctx, n, "v2", node.KindVeth)
	host := n.HostPeer()
	for _, v6 := range []bool{false, true} {
		spoofed := v2.Addr(v6)
		if err := v1.NS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName(node.IfName)
			if err != nil {
				return err
			}
			a := &netlink.Addr{IPNet: &net.IPNet{IP: spoofed.AsSlice(), Mask: net.CIDRMask(spoofed.BitLen(), spoofed.BitLen())}}
			if v6 {
				a.Flags = unix.IFA_F_NODAD
			}
			return netlink.AddrAdd(l, a)
		}); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			from   netip.Addr
			arrive bool
		}{
			{v1.Addr(v6), true},
			{spoofed, false},
		} {
			got, err := udpOnce(ctx, v1.NS, tc.from, host.NS, host.Addr(v6))
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.arrive {
				t.Errorf("v1 -> host from %s: arrived %t, want %t", tc.from, got, tc.arrive)
			}
		}
	}
}

// udpOnce sends a few datagrams from src in srcNS to a fresh socket on dst
// in dstNS and reports whether one of them arrived within a second.
func udpOnce(ctx context.Context, srcNS ns.NetNS, src netip.Addr, dstNS ns.NetNS, dst netip.Addr) (bool, error) {
	var rc *net.UDPConn
	if err := dstNS.Do(func(ns.NetNS) error {
		var err error
		rc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 0)))
		return err
	}); err != nil {
		return false, err
	}
	defer rc.Close()
	to := rc.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := srcNS.Do(func(ns.NetNS) error {
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(to))
		if err != nil {
			return err
		}
		defer c.Close()
		for range 3 {
			if _, err := c.Write([]byte("spoof?")); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return false, err
	}
	deadline := time.Now().Add(time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	rc.SetReadDeadline(deadline)
	buf := make([]byte, 64)
	_, from, err := rc.ReadFromUDPAddrPort(buf)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return false, nil
	case err != nil:
		return false, err
	case from.Addr().Unmap() != src:
		return false, errors.New("a datagram from " + from.String() + ", want " + src.String())
	}
	return true, nil
}

// TestVethBandwidthRefused: a veth link does not carry a bandwidth limit
// yet, so an ADD of kind veth that asks for one fails with code 7 saying
// so, and leaves nothing behind: no interface in the pod netns, no host
// side, no attachment, record or address in the agent.
func TestVethBandwidthRefused(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	x, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	rt := node.RuntimeConf("bw", "e2e-bw", x.Path(), node.KindVeth)
	rt.CapabilityArgs = map[string]any{"bandwidth": map[string]any{"ingressRate": 1_000_000, "ingressBurst": 100_000}}
	_, err = n.CNIAdd(ctx, n.CNI(t.TempDir()), networkList(t, n), rt)
	wantCode(t, "ADD", err, codeInvalidConfig)
	if err != nil && !strings.Contains(err.Error(), "bandwidth limits are not carried on veth links") {
		t.Errorf("ADD: %v; want it to say why", err)
	}
	wantLinks(t, x, "lo")
	wantHostLink(t, n, linkspec.HostVethName(linkspec.Key{ContainerID: rt.ContainerID, IfName: node.IfName}), false)
	wantNoAttachments(t, ctx, n)
}

// TestVethLeavesForeignVethAlone: a pod netns whose CNI_IFNAME is already
// another program's veth refuses an ADD of kind veth (code 121), and the
// DEL the runtime then runs succeeds and leaves that veth alone, both its
// ends: DEL deletes a veth pair only through the host side named for the
// link.
func TestVethLeavesForeignVethAlone(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	x, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Host.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "foreign0"}, PeerName: node.IfName, PeerNamespace: netlink.NsFd(int(x.Fd()))})
	}); err != nil {
		t.Fatal(err)
	}
	rt := node.RuntimeConf("foreign", "e2e-foreign", x.Path(), node.KindVeth)
	l := networkList(t, n)
	_, err = n.CNIAdd(ctx, n.CNI(t.TempDir()), l, rt)
	wantCode(t, "ADD", err, codeInterfaceExists)
	if err := n.CNIDel(ctx, n.CNI(t.TempDir()), l, rt); err != nil {
		t.Errorf("DEL: %v", err)
	}
	wantLinks(t, x, "lo", node.IfName)
	wantHostLink(t, n, "foreign0", true)
	wantHostLink(t, n, linkspec.HostVethName(linkspec.Key{ContainerID: rt.ContainerID, IfName: node.IfName}), false)
	wantNoAttachments(t, ctx, n)
}
