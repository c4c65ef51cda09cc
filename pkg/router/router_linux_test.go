package router

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/endpoint/tap"
)

// The test topology. Everything lives in namespaces the test creates.
var (
	podCIDR4 = netip.MustParsePrefix("10.244.1.0/24")
	podCIDR6 = netip.MustParsePrefix("2001:db8:0:1::/64")
	nodeGW4  = netip.MustParseAddr("10.244.1.1")
	nodeGW6  = netip.MustParseAddr("2001:db8:0:1::1")

	podA4 = netip.MustParseAddr("10.244.1.10")
	podA6 = netip.MustParseAddr("2001:db8:0:1::10")
	podB4 = netip.MustParseAddr("10.244.1.20")
	podB6 = netip.MustParseAddr("2001:db8:0:1::20")

	// The "outside" namespace is reached from the host over a veth. It
	// has an address outside the cluster (masqueraded towards) and one in
	// another node's pod CIDR (inside the cluster CIDR, not masqueraded),
	// and a route back to our pod CIDR only through the latter.
	clusterCIDR4 = netip.MustParsePrefix("10.244.0.0/16")
	clusterCIDR6 = netip.MustParsePrefix("2001:db8::/48")
	hostOut4     = netip.MustParsePrefix("198.51.100.1/24")
	hostOut6     = netip.MustParsePrefix("2001:db8:ff::1/64")
	outside4     = netip.MustParsePrefix("198.51.100.2/24")
	outside6     = netip.MustParsePrefix("2001:db8:ff::2/64")
	hostNode4    = netip.MustParsePrefix("10.244.2.1/24")
	hostNode6    = netip.MustParsePrefix("2001:db8:0:2::1/64")
	otherNode4   = netip.MustParsePrefix("10.244.2.2/24")
	otherNode6   = netip.MustParsePrefix("2001:db8:0:2::2/64")
)

// env is a host namespace running the router, two kernel pods and an
// outside namespace.
type env struct {
	host, outside ns.NetNS
	r             *Router
	a, b          *kernelPod
}

// dualStackConfig is the router configuration of most tests.
func dualStackConfig(masquerade bool) Config {
	return Config{
		PodCIDRs:     []netip.Prefix{podCIDR4, podCIDR6},
		ClusterCIDRs: []netip.Prefix{clusterCIDR4, clusterCIDR6},
		Masquerade:   masquerade,
	}
}

// newEnv builds the dual-stack test topology.
func newEnv(t testing.TB, cfg Config) *env {
	t.Helper()
	testutil.RequireRoot(t)
	e := &env{host: testutil.NewNS(t), outside: testutil.NewNS(t)}
	e.r = newHostRouter(t, e.host, cfg)
	e.a = newKernelPod(t, e.r, "pod-a", podA4, podA6)
	e.b = newKernelPod(t, e.r, "pod-b", podB4, podB6)
	connectOutside(t, e.host, e.outside)
	return e
}

// connectOutside links host and outside with a veth pair and lets the host
// forward (in the host namespace only).
func connectOutside(t testing.TB, host, outside ns.NetNS) {
	t.Helper()
	testutil.Do(t, host, func() error {
		for _, kv := range [][2]string{{"net.ipv4.ip_forward", "1"}, {"net.ipv6.conf.all.forwarding", "1"}} {
			if err := sysctl(kv[0], kv[1]); err != nil {
				return err
			}
		}
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "veth-out"}, PeerName: "veth-peer"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		peer, err := netlink.LinkByName("veth-peer")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(peer, int(outside.Fd())); err != nil {
			return err
		}
		return upWithAddrs("veth-out", hostOut4, hostOut6, hostNode4, hostNode6)
	})
	testutil.Do(t, outside, func() error {
		if err := upWithAddrs("veth-peer", outside4, outside6, otherNode4, otherNode6); err != nil {
			return err
		}
		for _, rt := range []struct {
			dst netip.Prefix
			via netip.Addr
		}{{podCIDR4, hostNode4.Addr()}, {podCIDR6, hostNode6.Addr()}} {
			route := &netlink.Route{Dst: prefixToIPNet(rt.dst), Gw: rt.via.AsSlice()}
			if err := netlink.RouteAdd(route); err != nil {
				return err
			}
		}
		return nil
	})
}

// upWithAddrs assigns addrs to the device name and brings it up.
func upWithAddrs(name string, addrs ...netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		addr := &netlink.Addr{IPNet: prefixToIPNet(a)}
		addr.IP = a.Addr().AsSlice()
		if a.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
	}
	return netlink.LinkSetUp(l)
}

// families names the two address families for table-driven subtests.
var families = []struct {
	name                         string
	gw, nodeGW, a, b             netip.Addr
	outside, otherNode, hostSide netip.Addr
}{
	{"IPv4", GatewayV4, nodeGW4, podA4, podB4, outside4.Addr(), otherNode4.Addr(), hostOut4.Addr()},
	{"IPv6", GatewayV6, nodeGW6, podA6, podB6, outside6.Addr(), otherNode6.Addr(), hostOut6.Addr()},
}

// TestForwarding proves, with real traffic, that the router answers the
// link-local gateway, forwards pod to pod, and connects host and pods
// through the uplink, in both families, without rewriting addresses.
func TestForwarding(t *testing.T) {
	e := newEnv(t, dualStackConfig(false))
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			if err := ping(e.a.ns, f.gw); err != nil {
				t.Errorf("pod to link-local gateway: %v", err)
			}
			if err := ping(e.a.ns, f.b); err != nil {
				t.Errorf("pod A to pod B: %v", err)
			}
			if err := ping(e.b.ns, f.a); err != nil {
				t.Errorf("pod B to pod A: %v", err)
			}
			if err := ping(e.host, f.a); err != nil {
				t.Errorf("host to pod: %v", err)
			}
			if err := ping(e.a.ns, f.nodeGW); err != nil {
				t.Errorf("pod to node gateway (host): %v", err)
			}

			before, err := e.r.LinkStats(e.a.id)
			if err != nil {
				t.Fatal(err)
			}
			if got := tcpTransfer(t, e.a.ns, e.b.ns, f.b); got != f.a {
				t.Errorf("pod to pod TCP: server saw client %s, want %s", got, f.a)
			}
			after, err := e.r.LinkStats(e.a.id)
			if err != nil {
				t.Fatal(err)
			}
			if got := after.RxBytes - before.RxBytes; got < transferSize {
				t.Errorf("pod A link RxBytes grew by %d during a %d-byte upload", got, transferSize)
			}
			if after.TxPackets <= before.TxPackets {
				t.Errorf("pod A link TxPackets did not grow (%d -> %d) though pod B acked", before.TxPackets, after.TxPackets)
			}

			if got := tcpTransfer(t, e.host, e.a.ns, f.a); got != f.nodeGW {
				t.Errorf("host to pod TCP: server saw client %s, want the node gateway %s", got, f.nodeGW)
			}
			if got := tcpTransfer(t, e.a.ns, e.host, f.nodeGW); got != f.a {
				t.Errorf("pod to host TCP: server saw client %s, want %s", got, f.a)
			}
		})
	}
	if up := e.r.UplinkStats(); up.RxPackets == 0 || up.TxPackets == 0 {
		t.Errorf("uplink stats %+v: want packets both ways", up)
	}
}

// TestMasquerade proves that pod traffic leaving the cluster is
// masqueraded to the host's address when enabled, and that traffic to a
// cluster CIDR, or any traffic with masquerade off, keeps the pod's address.
func TestMasquerade(t *testing.T) {
	for _, masq := range []bool{true, false} {
		name := map[bool]string{true: "on", false: "off"}[masq]
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, dualStackConfig(masq))
			for _, f := range families {
				t.Run(f.name, func(t *testing.T) {
					want := f.a
					if masq {
						want = f.hostSide
					}
					if got := tcpTransfer(t, e.a.ns, e.outside, f.outside); got != want {
						t.Errorf("pod to outside %s: server saw %s, want %s", f.outside, got, want)
					}
					if got := tcpTransfer(t, e.a.ns, e.outside, f.otherNode); got != f.a {
						t.Errorf("pod to cluster address %s: server saw %s, want the pod %s", f.otherNode, got, f.a)
					}
				})
			}
		})
	}
}

// listMasqTable returns the names of the chains of the host's shm-cni
// table, or nil when there is no such table.
func listMasqTable(t *testing.T, host ns.NetNS) []string {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(host.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ch := range chains {
		if ch.Table.Name == masqTableName {
			names = append(names, ch.Name)
		}
	}
	return names
}

// TestStartReplacesTable proves that Start replaces a left-over shm-cni
// table rather than failing or merging into it.
func TestStartReplacesTable(t *testing.T) {
	testutil.RequireRoot(t)
	host := testutil.NewNS(t)
	c, err := nftables.New(nftables.WithNetNSFd(int(host.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	stale := c.AddTable(masqTable())
	c.AddChain(&nftables.Chain{Name: "stale", Table: stale})
	if err := c.Flush(); err != nil {
		t.Fatalf("create stale table: %v", err)
	}
	r := newHostRouter(t, host, dualStackConfig(true))
	if got, want := listMasqTable(t, host), []string{masqChainName, antiSpoofChainName, hostPolicyForwardChain, hostPolicyInputChain}; !slices.Equal(got, want) {
		t.Errorf("chains after Start = %v, want %v", got, want)
	}
	if err := r.Start(); err == nil {
		t.Error("second Start succeeded")
	}
}

// TestRemoveLink proves that RemoveLink stops a pod's traffic, stops its
// endpoint's reader goroutine, leaves nothing that would hinder the same
// pod's return, and may be repeated.
func TestRemoveLink(t *testing.T) {
	e := newEnv(t, dualStackConfig(true))
	for _, f := range families {
		if err := ping(e.a.ns, f.b); err != nil {
			t.Fatalf("before removal: %v", err)
		}
	}
	readers := goroutinesIn(dispatchLoop)
	if err := e.r.RemoveLink(e.b.id); err != nil {
		t.Fatalf("RemoveLink: %v", err)
	}
	if got, want := goroutinesSettle(dispatchLoop, readers-1), readers-1; got != want {
		t.Errorf("endpoint readers after RemoveLink = %d, want %d", got, want)
	}
	if got, want := e.r.Links(), []string{e.a.id}; !slices.Equal(got, want) {
		t.Errorf("Links() = %v, want %v", got, want)
	}
	if _, err := e.r.LinkStats(e.b.id); !errors.Is(err, ErrUnknownLink) {
		t.Errorf("LinkStats of removed link: err = %v, want ErrUnknownLink", err)
	}
	for _, f := range families {
		drops := e.r.UnroutedDrops()
		if err := pingOnce(e.a.ns, f.b); err == nil {
			t.Errorf("%s: pod A still reaches removed pod B", f.name)
		}
		if err := pingOnce(e.host, f.b); err == nil {
			t.Errorf("%s: host still reaches removed pod B", f.name)
		}
		if got := e.r.UnroutedDrops(); got <= drops {
			t.Errorf("%s: unrouted drops %d -> %d: packets for the removed pod were not dropped by the router", f.name, drops, got)
		}
		if err := ping(e.a.ns, f.gw); err != nil {
			t.Errorf("%s: pod A lost its gateway: %v", f.name, err)
		}
	}
	if err := e.r.RemoveLink(e.b.id); err != nil {
		t.Errorf("second RemoveLink: %v", err)
	}

	// The same pod comes back on a new endpoint over its TAP fd.
	ep, err := tap.New(tap.Options{FD: e.b.fd, MTU: 1500, EthernetHeader: true, LinkAddress: gatewayMAC})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.r.AddLink(e.b.id, ep, Link{Addrs: e.b.addrs, PodMAC: e.b.mac}); err != nil {
		t.Fatalf("re-add link: %v", err)
	}
	for _, f := range families {
		if err := ping(e.a.ns, f.b); err != nil {
			t.Errorf("%s: after re-adding the link: %v", f.name, err)
		}
	}
}

// TestClose proves that Close removes the uplink device, the nftables
// table and every endpoint reader goroutine, and that the router refuses
// work afterwards.
func TestClose(t *testing.T) {
	testutil.RequireRoot(t)
	readers := goroutinesIn(dispatchLoop)
	e := newEnv(t, dualStackConfig(true))
	if err := ping(e.a.ns, podB4); err != nil {
		t.Fatal(err)
	}
	if got := listMasqTable(t, e.host); len(got) == 0 {
		t.Fatal("no shm-cni table after Start")
	}
	if err := e.r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := goroutinesSettle(dispatchLoop, readers); got != readers {
		t.Errorf("endpoint readers after Close = %d, want %d", got, readers)
	}
	testutil.Do(t, e.host, func() error {
		if _, err := netlink.LinkByName(DefaultUplinkName); err == nil {
			t.Errorf("uplink %s still exists after Close", DefaultUplinkName)
		}
		return nil
	})
	if got := listMasqTable(t, e.host); got != nil {
		t.Errorf("shm-cni table still has chains %v after Close", got)
	}
	if got := e.r.Links(); len(got) != 0 {
		t.Errorf("Links() after Close = %v", got)
	}
	if err := e.r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := e.r.Start(); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: err = %v, want ErrClosed", err)
	}
	ep, err := tap.New(tap.Options{FD: e.a.fd, MTU: 1500, EthernetHeader: true, LinkAddress: gatewayMAC})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.r.AddLink("late", ep, Link{Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.99")}, PodMAC: e.a.mac}); !errors.Is(err, ErrClosed) {
		t.Errorf("AddLink after Close: err = %v, want ErrClosed", err)
	}
}

// TestSingleStack proves that IPv4-only and IPv6-only routers forward.
func TestSingleStack(t *testing.T) {
	for _, tc := range []struct {
		name         string
		cidr         netip.Prefix
		a, b, nodeGW netip.Addr
	}{
		{"IPv4", podCIDR4, podA4, podB4, nodeGW4},
		{"IPv6", podCIDR6, podA6, podB6, nodeGW6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testutil.RequireRoot(t)
			host := testutil.NewNS(t)
			r := newHostRouter(t, host, Config{PodCIDRs: []netip.Prefix{tc.cidr}, Masquerade: true})
			a := newKernelPod(t, r, "a", tc.a)
			newKernelPod(t, r, "b", tc.b)
			if err := ping(a.ns, tc.b); err != nil {
				t.Errorf("pod to pod: %v", err)
			}
			if err := ping(host, tc.a); err != nil {
				t.Errorf("host to pod: %v", err)
			}
			if err := ping(a.ns, tc.nodeGW); err != nil {
				t.Errorf("pod to node gateway: %v", err)
			}
		})
	}
}
