package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
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
	// The pod side keeps the kernel's gso_max_size: a BBR sender's
	// streams through a lower one take half the rate (docs/speed.md); the
	// router cuts the super-packets a sandbox's link does not fit.
	const kernelDefault = 65536 // GSO_LEGACY_MAX_SIZE
	for _, p := range []*node.Pod{v1, v2} {
		if err := p.NS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err == nil && l.Attrs().GSOMaxSize != kernelDefault {
				err = fmt.Errorf("gso_max_size %d, want the kernel's default %d", l.Attrs().GSOMaxSize, kernelDefault)
			}
			return err
		}); err != nil {
			t.Errorf("pod %s: eth0: %v", p.Name, err)
		}
	}
	matrix(t, ctx, n, v1, v2, k, s)
}

// TestVethAntiSpoof: a pod on a veth link that sends from another pod's
// address (here its neighbour's, which it puts on its own interface) is
// dropped by the host before anything sees it, in both families, while the
// same datagram from its own address arrives. UDP, so that nothing but the
// drop could keep the datagram from the receiver (a spoofed TCP SYN would
// fail anyway, its answer going to the real owner). v1 has an egress
// bandwidth limit: what it sends crosses its ifb device first, which must
// not hide the host side it came in on.
func TestVethAntiSpoof(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	v1, err := n.AddPodWith(ctx, "v1", node.KindVeth, map[string]any{"bandwidth": bandwidthLimit})
	if err != nil {
		t.Fatal(err)
	}
	v2 := addPod(t, ctx, n, "v2", node.KindVeth)
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

// TestVethBandwidth: a veth link's bandwidth limit is the host's, as the
// reference bandwidth plugin's: a tbf qdisc at the root of the host side
// (to the pod), and (from the pod) an ifb device the host side's ingress
// qdisc redirects to, with a tbf at its root; a pod limited one way only
// gets only that. CHECK fails once a piece is gone, an agent restart puts
// it back, and DEL leaves neither device. (TestBandwidth shows the limits
// act on traffic.)
func TestVethBandwidth(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	l := networkList(t, n)
	both, err := n.AddPodWith(ctx, "both", node.KindVeth, map[string]any{"bandwidth": bandwidthLimit})
	if err != nil {
		t.Fatal(err)
	}
	in := linkspec.Bandwidth{IngressRate: bandwidthLimit.IngressRate, IngressBurst: bandwidthLimit.IngressBurst}
	ingress, err := n.AddPodWith(ctx, "ingress", node.KindVeth, map[string]any{"bandwidth": in})
	if err != nil {
		t.Fatal(err)
	}
	names := func(p *node.Pod) (veth, ifb string) {
		k := linkspec.Key{ContainerID: p.RT.ContainerID, IfName: node.IfName}
		return linkspec.HostVethName(k), linkspec.HostIfbName(k)
	}
	// shaped reports the host's qdiscs of p's link: a root tbf on the
	// host side, an ifb with a root tbf, a filter redirecting to it.
	type shaping struct{ hostTBF, ifbTBF, redirect bool }
	shaped := func(p *node.Pod) (s shaping) {
		veth, ifb := names(p)
		if err := n.Host.Do(func(ns.NetNS) error {
			h, err := netlink.LinkByName(veth)
			if err != nil {
				return err
			}
			s.hostTBF = hasRootTBF(t, h)
			b, err := netlink.LinkByName(ifb)
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return nil
			} else if err != nil {
				return err
			}
			s.ifbTBF = hasRootTBF(t, b)
			fs, err := netlink.FilterList(h, netlink.MakeHandle(0xffff, 0))
			if err != nil {
				return err
			}
			for _, f := range fs {
				if u, ok := f.(*netlink.U32); ok && u.RedirIndex == b.Attrs().Index {
					s.redirect = true
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return s
	}
	want := func(when string, p *node.Pod, w shaping) {
		t.Helper()
		if got := shaped(p); got != w {
			t.Errorf("%s: pod %s's shaping %+v, want %+v", when, p.Name, got, w)
		}
	}
	want("after ADD", both, shaping{true, true, true})
	want("after ADD", ingress, shaping{hostTBF: true})
	wantBandwidths(t, ctx, n, map[*node.Pod]*linkspec.Bandwidth{both: &bandwidthLimit, ingress: &in})

	// The host side loses its tbf: CHECK fails until an agent restart
	// re-adopts the link and puts it back.
	veth, ifb := names(both)
	if err := n.Host.Do(func(ns.NetNS) error {
		h, err := netlink.LinkByName(veth)
		if err != nil {
			return err
		}
		return netlink.QdiscDel(&netlink.Tbf{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: h.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT}})
	}); err != nil {
		t.Fatal(err)
	}
	err = n.CNICheck(ctx, n.CNI(""), l, both.RT)
	if err == nil || !strings.Contains(err.Error(), "tbf qdisc on "+veth+" is gone") {
		t.Errorf("CHECK without the host side's tbf: %v, want it to say the tbf is gone", err)
	}
	if err := n.StopAgent(); err != nil {
		t.Fatal(err)
	}
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	want("after the restart", both, shaping{true, true, true})
	for _, p := range []*node.Pod{both, ingress} {
		if err := n.CNICheck(ctx, n.CNI(""), l, p.RT); err != nil {
			t.Errorf("CHECK %s after the restart: %v", p.Name, err)
		}
	}

	for _, p := range []*node.Pod{both, ingress} {
		if err := n.DeletePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	wantHostLink(t, n, veth, false)
	wantHostLink(t, n, ifb, false)
	wantNoAttachments(t, ctx, n)
}

// hasRootTBF reports whether l has a tbf qdisc at its root.
func hasRootTBF(t *testing.T, l netlink.Link) bool {
	t.Helper()
	qs, err := netlink.QdiscList(l)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		if q.Type() == "tbf" && q.Attrs().Parent == netlink.HANDLE_ROOT {
			return true
		}
	}
	return false
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

// TestGatewayAnswers: a kernel pod's gateways (169.254.1.1, fe80::1)
// answer its pings whatever its link: on a tap link the router, on a veth
// link the host, which holds both on the host side (so a veth pod's packet
// to its gateway is the host's, never forwarded off the node).
func TestGatewayAnswers(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	for _, kind := range []string{node.KindTap, node.KindVeth} {
		p := addPod(t, ctx, n, kind, kind)
		for _, gw := range []netip.Addr{netip.MustParseAddr("169.254.1.1"), netip.MustParseAddr("fe80::1").WithZone(node.IfName)} {
			if err := echoOnce(p.NS, gw); err != nil {
				t.Errorf("%s pod: ping %s: %v", kind, gw, err)
			}
		}
	}
}

// echoOnce sends an ICMP echo request to dst from x and waits a second for
// the reply from dst.
func echoOnce(x ns.NetNS, dst netip.Addr) error {
	return x.Do(func(ns.NetNS) error {
		network, proto := "ip4:icmp", 1
		var typ icmp.Type = ipv4.ICMPTypeEcho
		if dst.Is6() {
			network, proto, typ = "ip6:ipv6-icmp", 58, ipv6.ICMPTypeEchoRequest
		}
		c, err := icmp.ListenPacket(network, "")
		if err != nil {
			return err
		}
		defer c.Close()
		req, err := (&icmp.Message{Type: typ, Body: &icmp.Echo{ID: 0x5eed, Seq: 1, Data: []byte("gateway?")}}).Marshal(nil)
		if err != nil {
			return err
		}
		to := &net.IPAddr{IP: dst.AsSlice(), Zone: dst.Zone()}
		for range 3 {
			if _, err := c.WriteTo(req, to); err != nil {
				return err
			}
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return err
			}
			m, err := icmp.ParseMessage(proto, buf[:n])
			if err != nil {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == 0x5eed && (m.Type == ipv4.ICMPTypeEchoReply || m.Type == ipv6.ICMPTypeEchoReply) {
				if got, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP); got.Unmap() != dst.WithZone("") {
					return errors.New("a reply from " + from.String())
				}
				return nil
			}
		}
	})
}
