package kube

import (
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// hostNS is a fresh network namespace standing in for a node's host: a
// veth pair "peers0"/"peers1" up, peers0 with 192.0.2.1/24 and
// 2001:db8::1/64, so that gateways in those networks are on link. Removed
// when t ends.
type hostNS struct {
	ns ns.NetNS
	nl *netlink.Handle
}

func newHostNS(t *testing.T) *hostNS {
	t.Helper()
	testutil.RequireRoot(t)
	n := testutil.NewNS(t)
	nl, err := netlink.NewHandleAt(netns.NsHandle(n.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "peers0"}, PeerName: "peers1"}
	if err := nl.LinkAdd(l); err != nil {
		t.Fatal(err)
	}
	peer, err := nl.LinkByName("peers1")
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkSetUp(peer); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"192.0.2.1/24", "2001:db8::1/64"} {
		p := netip.MustParsePrefix(a)
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}, Flags: unix.IFA_F_NODAD}
		if err := nl.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
	}
	if err := nl.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	return &hostNS{ns: n, nl: nl}
}

// addRoute adds a route of protocol proto via gw.
func (h *hostNS) addRoute(t *testing.T, dst, gw string, proto netlink.RouteProtocol) {
	t.Helper()
	r := toNetlink(Route{Dst: netip.MustParsePrefix(dst), Via: netip.MustParseAddr(gw)})
	r.Protocol = proto
	if err := h.nl.RouteAdd(r); err != nil {
		t.Fatalf("add route %s via %s: %v", dst, gw, err)
	}
}

// gatewayRoutes returns every route with a gateway of the main table,
// whatever its protocol, as "dst=gw proto N".
func (h *hostNS) gatewayRoutes(t *testing.T) []string {
	t.Helper()
	rs, err := h.nl.RouteList(nil, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, x := range rs {
		if rt, ok := fromNetlink(x); ok {
			out = append(out, rt.String()+" proto "+x.Protocol.String())
		}
	}
	return out
}
