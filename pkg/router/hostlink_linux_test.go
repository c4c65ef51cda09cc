package router

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"gvisor.dev/gvisor/pkg/tcpip/link/channel"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// Addresses of a pod the host routes (AddHostLink), inside the pod CIDRs.
var (
	hostPod4 = netip.MustParseAddr("10.244.1.30")
	hostPod6 = netip.MustParseAddr("2001:db8:0:1::30")
)

// TestHostLink: a pod the host routes (here its addresses sit on the host's
// loopback, where a veth link's pod sits behind a device route) is reached
// from a pod link through the uplink, on the fast path but for the SYN,
// and sees the client's own address, in both families. Without the host
// link the router takes its addresses for unassigned ones of its own and
// drops what is sent to them; with it, no link may take them; removed, they
// are dropped again.
func TestHostLink(t *testing.T) {
	e := newEnv(t, dualStackConfig(true))
	testutil.Do(t, e.host, func() error {
		return upWithAddrs("lo", netip.PrefixFrom(hostPod4, 32), netip.PrefixFrom(hostPod6, 128))
	})
	unreachable := func(t *testing.T) {
		t.Helper()
		for _, a := range []netip.Addr{hostPod4, hostPod6} {
			before := e.r.UnroutedDrops()
			if err := pingOnce(e.a.ns, a); err == nil {
				t.Errorf("pod to %s without a host link: answered, want it dropped", a)
			}
			if e.r.UnroutedDrops() == before {
				t.Errorf("pod to %s without a host link: not counted as unrouted", a)
			}
		}
	}
	unreachable(t)

	if err := e.r.AddHostLink("host-pod", []netip.Addr{hostPod4, hostPod6}); err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		to := hostPod4
		if f.a.Is6() {
			to = hostPod6
		}
		t.Run(f.name, func(t *testing.T) { transferFastToUplink(t, e, e.host, to, f.a) })
	}

	for _, tc := range []struct {
		name string
		add  func() error
	}{
		{"a link", func() error {
			return e.r.AddLink("pod-c", channel.New(1, 1500, ""), Link{Addrs: []netip.Addr{hostPod4}})
		}},
		{"a host link", func() error { return e.r.AddHostLink("host-pod-2", []netip.Addr{hostPod6}) }},
		{"the same id", func() error { return e.r.AddHostLink("host-pod", []netip.Addr{netip.MustParseAddr("10.244.1.31")}) }},
	} {
		if err := tc.add(); err == nil || !strings.Contains(err.Error(), "in use") && !strings.Contains(err.Error(), "exists") {
			t.Errorf("%s at a host link's address or id: %v, want refused", tc.name, err)
		}
	}
	if err := e.r.AddHostLink("host-pod-3", []netip.Addr{netip.MustParseAddr("10.9.9.9")}); err == nil {
		t.Error("a host link outside the pod CIDRs: accepted, want refused")
	}

	if err := e.r.RemoveLink("host-pod"); err != nil {
		t.Fatal(err)
	}
	unreachable(t)
	if err := e.r.RemoveLink("host-pod"); err != nil {
		t.Errorf("removing it again: %v", err)
	}
}

// TestAntiSpoofPutBack: the periodic host check puts back the anti-spoofing
// of veth links when another program flushes its chain, and counts the
// repair.
func TestAntiSpoofPutBack(t *testing.T) {
	testutil.RequireRoot(t)
	host := testutil.NewNS(t)
	cfg := dualStackConfig(true)
	cfg.HostCheckInterval = 50 * time.Millisecond
	r := newHostRouter(t, host, cfg)
	c, err := nftables.New(nftables.WithNetNSFd(int(host.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	chain := &nftables.Chain{Name: antiSpoofChainName, Table: masqTable()}
	rules := func() int {
		rs, err := c.GetRules(chain.Table, chain)
		if err != nil {
			return -1
		}
		return len(rs)
	}
	if got := rules(); got != 1 {
		t.Fatalf("anti-spoofing rules after Start: %d, want 1", got)
	}
	c.FlushChain(chain)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for rules() != 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := rules(); got != 1 {
		t.Errorf("anti-spoofing rules after a flush: %d, want 1 put back", got)
	}
	if r.HostRepairs() == 0 {
		t.Error("the repair was not counted")
	}
}
