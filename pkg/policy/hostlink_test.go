package policy

import (
	"net/netip"
	"slices"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
)

// TestFromHostLink checks the judgement of packets the host's kernel
// queues: the same verdicts as FromPod's for a connection's first packet,
// with nothing tracked for what passes (the kernel tracks it).
func TestFromHostLink(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, isolateClient...)
	client, db, web := endpoints["client"].v4, endpoints["db"].v4, endpoints["web"].v4
	for _, tc := range []struct {
		name    string
		p       packet
		fromPod bool
		want    bool
	}{
		{"allowed egress", packet{src: client, dst: db, proto: ProtoTCP, sport: 40000, dport: 5432, flags: tcpSyn}, true, true},
		{"egress no rule gives", packet{src: client, dst: web, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpSyn}, true, false},
		{"ingress to an isolated pod", packet{src: web, dst: client, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpSyn}, false, false},
		{"ingress to an isolated pod from a pod", packet{src: db, dst: client, proto: ProtoUDP, sport: 53, dport: 53}, true, false},
		{"between pods no policy isolates", packet{src: web, dst: db, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpSyn}, true, true},
		{"a segment of neither way's connection", packet{src: client, dst: web, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpAck}, true, false},
	} {
		if got := e.FromHostLink(tc.p.bytes(), tc.fromPod); got != tc.want {
			t.Errorf("%s: FromHostLink = %v, want %v", tc.name, got, tc.want)
		}
	}
	if n := e.Tracker().Len(); n != 0 {
		t.Errorf("%d connections tracked, want none (the kernel tracks them)", n)
	}
}

// TestRevoke checks that a connection the kernel tracked and a new
// snapshot denies, once revoked, is dropped both ways when its packets come
// back to the enforcer (the other side's included, which might open a
// connection of its own), and passes again under a snapshot that allows it.
func TestRevoke(t *testing.T) {
	out := func(port int32) *networkingv1.NetworkPolicy {
		return netpol("prod", "client-out", sel("app", "client"), egressOnly, nil,
			to(ports(tcpPort(port)), podPeer(sel("app", "db"), nil)))
	}
	e, _ := enforcer(t, DefaultTrackerConfig, out(9999))
	c := packet{src: endpoints["client"].v4, dst: endpoints["db"].v4, proto: ProtoTCP, sport: 40001, dport: 9999, flags: tcpSyn}
	if !e.FromHostLink(c.bytes(), true) {
		t.Fatal("the connection was denied before the change")
	}
	orig := Tuple{Src: c.src, Dst: c.dst, SrcPort: c.sport, DstPort: c.dport, Proto: ProtoTCP}
	if !e.Allows(orig) {
		t.Fatal("Allows denies the connection before the change")
	}
	e.Set(Compile(clusterInput(out(5432)), e.Snapshot()))
	if e.Allows(orig) {
		t.Fatal("Allows keeps the connection the new snapshot denies")
	}
	if !e.Revoke(orig, false) {
		t.Fatal("Revoke found no room")
	}
	c.flags = tcpAck
	if e.FromHostLink(c.bytes(), true) {
		t.Errorf("the client's side of the revoked connection passed")
	}
	if e.FromHostLink(c.reply().bytes(), true) {
		t.Errorf("the db's side of the revoked connection passed (as a connection db may open)")
	}
	e.Set(Compile(clusterInput(out(9999)), e.Snapshot()))
	if !e.FromHostLink(c.bytes(), true) || !e.FromHostLink(c.reply().bytes(), true) {
		t.Errorf("the revoked connection did not resume when allowed again")
	}
	e.Set(nil)
	if e.Revoke(orig, false) {
		t.Errorf("Revoke without a snapshot reported true")
	}
}

// TestIsolatedAddrs checks the addresses the host's kernel queues packets
// of: the isolated local pods', both families, and nothing else's.
func TestIsolatedAddrs(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, isolateClient...)
	got := e.Snapshot().IsolatedAddrs()
	want := []netip.Addr{endpoints["client"].v4, endpoints["client"].v6}
	slices.SortFunc(want, netip.Addr.Compare)
	if !slices.Equal(got, want) {
		t.Errorf("IsolatedAddrs = %v, want %v", got, want)
	}
	e2, _ := enforcer(t, DefaultTrackerConfig)
	if got := e2.Snapshot().IsolatedAddrs(); len(got) != 0 {
		t.Errorf("IsolatedAddrs without policy = %v, want none", got)
	}
}
