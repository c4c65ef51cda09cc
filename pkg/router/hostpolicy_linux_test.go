package router

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/policy"
)

// setAddrs returns the addresses in the router's set name, sorted.
func setAddrs(t *testing.T, host ns.NetNS, name string) []netip.Addr {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(host.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.GetSetByName(masqTable(), name)
	if err != nil {
		t.Fatalf("set %s: %v", name, err)
	}
	els, err := c.GetSetElements(s)
	if err != nil {
		t.Fatalf("elements of %s: %v", name, err)
	}
	var out []netip.Addr
	for _, e := range els {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok {
			t.Fatalf("set %s holds %x", name, e.Key)
		}
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// TestHostPolicyTable: a started router enforces policy on host links
// (HostPolicy); its sets hold the addresses policy isolates, follow each
// snapshot and empty without one; the periodic host check puts back the
// policy chains, with the sets' addresses, when another program deletes
// them, and counts the repair. Close takes them with the table.
func TestHostPolicyTable(t *testing.T) {
	testutil.RequireRoot(t)
	host := testutil.NewNS(t)
	cfg := dualStackConfig(true)
	cfg.HostCheckInterval = 50 * time.Millisecond
	r := newHostRouter(t, host, cfg)
	if !r.HostPolicy() {
		t.Fatal("HostPolicy() = false after Start")
	}
	if got, want := listMasqTable(t, host), []string{masqChainName, antiSpoofChainName, hostPolicyForwardChain, hostPolicyInputChain}; !slices.Equal(got, want) {
		t.Errorf("chains after Start = %v, want %v", got, want)
	}
	check := func(when string, want4, want6 []netip.Addr) {
		t.Helper()
		if got := setAddrs(t, host, hostPolicySet4); !slices.Equal(got, want4) {
			t.Errorf("%s: %s = %v, want %v", when, hostPolicySet4, got, want4)
		}
		if got := setAddrs(t, host, hostPolicySet6); !slices.Equal(got, want6) {
			t.Errorf("%s: %s = %v, want %v", when, hostPolicySet6, got, want6)
		}
	}
	check("after Start", nil, nil)
	// denyIngress isolates a and b; bFromA alone isolates b.
	r.SetPolicy(policy.Compile(policyInput(denyIngress), nil))
	check("both isolated", []netip.Addr{podA4, podB4}, []netip.Addr{podA6, podB6})
	r.SetPolicy(policy.Compile(policyInput(bFromA(8080)), r.Policy()))
	check("b isolated", []netip.Addr{podB4}, []netip.Addr{podB6})

	c, err := nftables.New(nftables.WithNetNSFd(int(host.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	c.DelChain(&nftables.Chain{Name: hostPolicyForwardChain, Table: masqTable()})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	fwd, _ := hostPolicyRuleCounts()
	rules := func() int {
		rs, err := c.GetRules(masqTable(), &nftables.Chain{Name: hostPolicyForwardChain, Table: masqTable()})
		if err != nil {
			return -1
		}
		return len(rs)
	}
	deadline := time.Now().Add(10 * time.Second)
	for rules() != fwd && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := rules(); got != fwd {
		t.Fatalf("policy forward rules after a delete: %d, want %d put back", got, fwd)
	}
	if r.HostRepairs() == 0 {
		t.Error("the repair was not counted")
	}
	check("put back", []netip.Addr{podB4}, []netip.Addr{podB6})
	r.SetPolicy(nil)
	check("without policy", nil, nil)

	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if r.HostPolicy() {
		t.Error("HostPolicy() = true after Close")
	}
	if got := listMasqTable(t, host); len(got) != 0 {
		t.Errorf("chains after Close = %v, want none", got)
	}
}

// TestHostPolicySetAfterStop: a snapshot that reaches the host policy after
// the router stopped it (SetPolicy racing with Close) is ignored, where it
// would have sent on the walker's closed channel.
func TestHostPolicySetAfterStop(t *testing.T) {
	testutil.RequireRoot(t)
	host := testutil.NewNS(t)
	r := newHostRouter(t, host, dualStackConfig(true))
	h := r.hostPol.Load()
	if h == nil {
		t.Fatal("no host policy after Start")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	h.setPolicy(policy.Compile(policyInput(denyIngress), nil))
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.addrs) != 0 {
		t.Errorf("addresses %v taken after stop", h.addrs)
	}
}
