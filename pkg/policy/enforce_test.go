package policy

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
)

// packet builds the headers of an IP packet from src to dst: proto with
// ports (TCP, UDP, SCTP; TCP with flags) or an ICMP message of type typ
// with identifier id.
type packet struct {
	src, dst     netip.Addr
	proto        uint8
	sport, dport uint16
	flags        uint8
	typ          uint8  // ICMP type
	id           uint16 // ICMP echo identifier
	quote        []byte // an ICMP error's quoted packet
	fragOff      uint16 // IPv4 fragment offset in 8-byte units
}

func (p packet) bytes() []byte {
	var l4 []byte
	switch p.proto {
	case ProtoTCP:
		l4 = make([]byte, 20)
		l4[12] = 5 << 4
		l4[13] = p.flags
	case ProtoUDP:
		l4 = make([]byte, 8)
	case ProtoSCTP:
		l4 = make([]byte, 12)
	case ProtoICMP, ProtoICMPv6:
		l4 = make([]byte, 8)
		l4[0] = p.typ
		binary.BigEndian.PutUint16(l4[4:], p.id)
		l4 = append(l4, p.quote...)
	}
	if p.proto == ProtoTCP || p.proto == ProtoUDP || p.proto == ProtoSCTP {
		binary.BigEndian.PutUint16(l4[0:], p.sport)
		binary.BigEndian.PutUint16(l4[2:], p.dport)
	}
	if p.src.Is4() {
		h := make([]byte, 20)
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
		binary.BigEndian.PutUint16(h[6:], p.fragOff)
		h[8] = 64
		h[9] = p.proto
		copy(h[12:], p.src.AsSlice())
		copy(h[16:], p.dst.AsSlice())
		return append(h, l4...)
	}
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(l4)))
	h[6] = p.proto
	h[7] = 64
	copy(h[8:], p.src.AsSlice())
	copy(h[24:], p.dst.AsSlice())
	return append(h, l4...)
}

// reply is the packet the other way; a SYN's reply is a SYN-ACK.
func (p packet) reply() packet {
	p.src, p.dst, p.sport, p.dport = p.dst, p.src, p.dport, p.sport
	if p.flags&tcpSyn != 0 {
		p.flags |= tcpAck
	}
	return p
}

func icmpFor(a netip.Addr) uint8 {
	if a.Is4() {
		return ProtoICMP
	}
	return ProtoICMPv6
}

// enforcer returns an enforcer with snapshot of pols installed, its
// tracker on a clock the test moves.
func enforcer(t *testing.T, cfg TrackerConfig, pols ...*networkingv1.NetworkPolicy) (*Enforcer, *int64) {
	t.Helper()
	e, err := NewEnforcer(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	clock := new(int64)
	e.ct.now = func() int64 { return *clock }
	e.Set(Compile(clusterInput(pols...), nil))
	return e, clock
}

// isolateClient: prod/client takes nothing in, and may send to prod/db
// port 5432 (TCP, UDP, SCTP) and ping it.
var isolateClient = []*networkingv1.NetworkPolicy{
	netpol("prod", "client", sel("app", "client"),
		[]networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}, nil,
		[]networkingv1.NetworkPolicyEgressRule{
			{To: []networkingv1.NetworkPolicyPeer{podPeer(sel("app", "db"), nil)}, Ports: ports(tcpPort(5432), udpPort(5432), sctpPort(5432))},
			{To: []networkingv1.NetworkPolicyPeer{blockPeer("10.0.0.11/32"), blockPeer("fd00::11/128")}},
		}),
}

// TestRepliesPass checks, for each tracked protocol, that a connection
// policy allows one way has its replies let through the other way, where
// a connection of its own is denied, and that ICMP errors about it pass.
func TestRepliesPass(t *testing.T) {
	for _, fam := range []string{"IPv4", "IPv6"} {
		client, db := endpoints["client"].v4, endpoints["db"].v4
		if fam == "IPv6" {
			client, db = endpoints["client"].v6, endpoints["db"].v6
		}
		for _, tc := range []struct {
			name string
			out  packet
		}{
			{"TCP", packet{src: client, dst: db, proto: ProtoTCP, sport: 40000, dport: 5432, flags: tcpSyn}},
			{"UDP", packet{src: client, dst: db, proto: ProtoUDP, sport: 40000, dport: 5432}},
			{"SCTP", packet{src: client, dst: db, proto: ProtoSCTP, sport: 40000, dport: 5432}},
			{"ICMP echo", packet{src: client, dst: db, proto: icmpFor(client), typ: map[bool]uint8{true: 8, false: 128}[client.Is4()], id: 7}},
		} {
			t.Run(fam+"/"+tc.name, func(t *testing.T) {
				e, _ := enforcer(t, DefaultTrackerConfig, isolateClient...)
				back := tc.out.reply()
				if tc.out.proto == ProtoTCP {
					back.flags = tcpSyn | tcpAck
				}
				if tc.out.proto == icmpFor(client) {
					back.typ = map[bool]uint8{true: 0, false: 129}[client.Is4()]
				}
				if e.FromPod(back.bytes()) {
					t.Fatalf("the reply passed before the connection was opened")
				}
				if !e.FromPod(tc.out.bytes()) {
					t.Fatalf("client -> db denied")
				}
				if !e.FromPod(back.bytes()) {
					t.Fatalf("db -> client reply denied")
				}
				if !e.FromPod(tc.out.bytes()) {
					t.Fatalf("client -> db second packet denied")
				}
				other := back
				other.sport = 81
				if tc.out.proto == icmpFor(client) {
					other.typ, other.id = map[bool]uint8{true: 8, false: 128}[client.Is4()], 8
				}
				if e.FromPod(other.bytes()) {
					t.Fatalf("db -> client new connection allowed, want denied")
				}
				// An ICMP error from db about a packet client sent.
				icmpErr := packet{src: db, dst: client, proto: icmpFor(client), typ: map[bool]uint8{true: 3, false: 1}[client.Is4()], quote: tc.out.bytes()}
				if !e.FromPod(icmpErr.bytes()) {
					t.Fatalf("ICMP error about the connection denied")
				}
				icmpErr.quote = other.reply().bytes()
				if e.FromPod(icmpErr.bytes()) {
					t.Fatalf("ICMP error about nothing tracked allowed")
				}
				c := e.Counts()
				var denied uint64
				for _, pc := range c {
					if pc.Pod == "client" {
						denied = pc.Denied[Ingress]
					}
				}
				if denied != 3 {
					t.Errorf("client's denied ingress = %d, want 3", denied)
				}
			})
		}
	}
}

// TestPolicyChange checks that a new snapshot keeps a tracked connection
// it still allows, packet for packet, and stops one it denies, both ways.
func TestPolicyChange(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, isolateClient...)
	client, db := endpoints["client"].v4, endpoints["db"].v4
	kept := packet{src: client, dst: db, proto: ProtoTCP, sport: 40000, dport: 5432, flags: tcpSyn}
	cut := packet{src: client, dst: db, proto: ProtoTCP, sport: 40001, dport: 5432, flags: tcpSyn}
	cut.dport = 9999 // allowed by the /32 block (every port)
	for _, p := range []packet{kept, kept.reply(), cut, cut.reply()} {
		if !e.FromPod(p.bytes()) {
			t.Fatalf("%+v denied before the change", p)
		}
	}
	// The block goes: port 5432 stays allowed, 9999 does not.
	narrowed := netpol("prod", "client", sel("app", "client"),
		[]networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}, nil,
		to(ports(tcpPort(5432)), podPeer(sel("app", "db"), nil)))
	e.Set(Compile(clusterInput(narrowed), e.Snapshot()))
	kept.flags, cut.flags = tcpAck, tcpAck
	if !e.FromPod(kept.reply().bytes()) || !e.FromPod(kept.bytes()) {
		t.Errorf("a connection the new policy allows was cut")
	}
	if e.FromPod(cut.reply().bytes()) {
		t.Errorf("the reply of a connection the new policy denies passed")
	}
	if e.FromPod(cut.bytes()) {
		t.Errorf("a connection the new policy denies carried on")
	}
	if got := e.Tracker().Len(); got != 2 {
		t.Errorf("tracked connections = %d, want 2 (one of them denied)", got)
	}
}

// TestDeniedStaysDenied checks that a connection a new snapshot denies
// stays denied both ways even where the other side may open connections
// of its own to the pod (its packets are not judged as one of those), and
// resumes under a snapshot that allows it again.
func TestDeniedStaysDenied(t *testing.T) {
	out := func(port int32) *networkingv1.NetworkPolicy {
		return netpol("prod", "client-out", sel("app", "client"), egressOnly, nil,
			to(ports(tcpPort(port)), podPeer(sel("app", "db"), nil)))
	}
	e, _ := enforcer(t, DefaultTrackerConfig, out(9999))
	c := packet{src: endpoints["client"].v4, dst: endpoints["db"].v4, proto: ProtoTCP, sport: 40001, dport: 9999, flags: tcpSyn}
	if !e.FromPod(c.bytes()) || !e.FromPod(c.reply().bytes()) {
		t.Fatalf("denied before the change")
	}
	c.flags = tcpAck
	e.Set(Compile(clusterInput(out(5432)), e.Snapshot()))
	if e.FromPod(c.reply().bytes()) {
		t.Errorf("db's side of the denied connection passed (as a connection db may open)")
	}
	if e.FromPod(c.bytes()) {
		t.Errorf("client's side of the denied connection passed")
	}
	e.Set(Compile(clusterInput(out(9999)), e.Snapshot()))
	if !e.FromPod(c.bytes()) || !e.FromPod(c.reply().bytes()) {
		t.Errorf("the connection did not resume when allowed again")
	}
}

// TestPickUp checks that a TCP connection open before its pod became
// isolated carries on when it may open the other way, and that a SYN
// does not.
func TestPickUp(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, isolateClient...)
	client, db := endpoints["client"].v4, endpoints["db"].v4
	// db -> client data of a connection client opened before: not tracked.
	mid := packet{src: db, dst: client, proto: ProtoTCP, sport: 5432, dport: 40000, flags: tcpAck}
	if !e.FromPod(mid.bytes()) {
		t.Fatalf("mid-stream segment of a connection client may open denied")
	}
	if !e.FromPod(mid.reply().bytes()) {
		t.Fatalf("client's side of the picked-up connection denied")
	}
	syn := mid
	syn.sport, syn.flags = 5433, tcpSyn
	if e.FromPod(syn.bytes()) {
		t.Fatalf("db -> client SYN allowed")
	}
	udp := packet{src: db, dst: client, proto: ProtoUDP, sport: 5432, dport: 40000}
	if e.FromPod(udp.bytes()) {
		t.Fatalf("an untracked datagram the policy denies passed")
	}
}

// TestHostToPod checks that the node reaches an isolated pod (kubelet
// probes), through the uplink, and its replies go back.
func TestHostToPod(t *testing.T) {
	e, err := NewEnforcer(DefaultTrackerConfig, []netip.Addr{netip.MustParseAddr("10.0.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	e.Set(Compile(clusterInput(isolateClient...), nil))
	client := endpoints["client"].v4
	for _, node := range []netip.Addr{netip.MustParseAddr("10.0.0.1"), endpoints["node"].v4} {
		probe := packet{src: node, dst: client, proto: ProtoTCP, sport: 50000, dport: 8080, flags: tcpSyn}
		if !e.FromUplink(probe.bytes()) {
			t.Errorf("probe from node address %s denied", node)
		}
		if !e.FromPod(probe.reply().bytes()) {
			t.Errorf("probe reply to node address %s denied", node)
		}
	}
	other := packet{src: endpoints["ext"].v4, dst: client, proto: ProtoTCP, sport: 50000, dport: 8080, flags: tcpSyn}
	if e.FromUplink(other.bytes()) {
		t.Errorf("an outside address reached an isolated pod")
	}
	notLocal := packet{src: endpoints["ext"].v4, dst: endpoints["far"].v4, proto: ProtoTCP, sport: 1, dport: 2}
	if !e.FromUplink(notLocal.bytes()) {
		t.Errorf("a packet for no local pod was judged")
	}
}

// TestServices checks that a pod's packets to a Service address skip its
// egress rules and that the Service's replies come back.
func TestServices(t *testing.T) {
	in := clusterInput(isolateClient...)
	in.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}
	e, err := NewEnforcer(DefaultTrackerConfig, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.Set(Compile(in, nil))
	svc := packet{src: endpoints["client"].v4, dst: netip.MustParseAddr("10.96.0.10"), proto: ProtoUDP, sport: 3333, dport: 53}
	if !e.FromPod(svc.bytes()) {
		t.Fatalf("client -> Service denied")
	}
	if !e.FromUplink(svc.reply().bytes()) {
		t.Fatalf("the Service's reply denied")
	}
	// Translated by the host to web, it comes back through the uplink and
	// meets client's egress rules: web is not allowed.
	dnat := svc
	dnat.dst = endpoints["web"].v4
	if e.FromUplink(dnat.bytes()) {
		t.Fatalf("client -> Service -> web passed client's egress rules")
	}
}

// TestTimeouts checks each state's timeout on the tracker's clock (a
// TCP segment without SYN would be picked up again: the table is read).
func TestTimeouts(t *testing.T) {
	cfg := DefaultTrackerConfig
	client, db := endpoints["client"].v4, endpoints["db"].v4
	for _, tc := range []struct {
		name    string
		out     packet
		replyFl uint8
		closeFl uint8
		life    time.Duration
	}{
		{"TCP unanswered", packet{src: client, dst: db, proto: ProtoTCP, sport: 1, dport: 5432, flags: tcpSyn}, 0, 0, cfg.Unreplied},
		{"TCP established", packet{src: client, dst: db, proto: ProtoTCP, sport: 1, dport: 5432, flags: tcpSyn}, tcpSyn | tcpAck, 0, cfg.TCPEstablished},
		{"TCP closing", packet{src: client, dst: db, proto: ProtoTCP, sport: 1, dport: 5432, flags: tcpSyn}, tcpSyn | tcpAck, tcpFin | tcpAck, cfg.TCPClosing},
		{"UDP answered", packet{src: client, dst: db, proto: ProtoUDP, sport: 1, dport: 5432}, 0, 0, cfg.Datagram},
	} {
		for _, after := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/after=%v", tc.name, after), func(t *testing.T) {
				e, clock := enforcer(t, cfg, isolateClient...)
				e.FromPod(tc.out.bytes())
				back := tc.out.reply()
				back.flags = tc.replyFl
				if tc.replyFl != 0 || tc.out.proto == ProtoUDP {
					if !e.FromPod(back.bytes()) {
						t.Fatalf("reply denied")
					}
				}
				if tc.closeFl != 0 {
					fin := tc.out
					fin.flags = tc.closeFl
					e.FromPod(fin.bytes())
				}
				*clock += int64(tc.life) - 1
				want := 1
				if after {
					*clock++
					want = 0
				}
				e.Tracker().Expire()
				if got := e.Tracker().Len(); got != want {
					t.Fatalf("%v after the last packet (timeout %v): %d connections tracked, want %d", time.Duration(*clock), tc.life, got, want)
				}
			})
		}
	}
}

// TestPodShare checks that a pod flooding new flows fills its share and
// no more: the table stays bounded and another pod still opens its own.
func TestPodShare(t *testing.T) {
	cfg := DefaultTrackerConfig
	cfg.MaxConns, cfg.PodShare = 64, 16
	e, _ := enforcer(t, cfg, netpol("prod", "all", sel(), []networkingv1.PolicyType{"Ingress", "Egress"},
		[]networkingv1.NetworkPolicyIngressRule{{}}, []networkingv1.NetworkPolicyEgressRule{{}}))
	client, web := endpoints["client"].v4, endpoints["web"].v4
	flood := packet{src: client, dst: endpoints["ext"].v4, proto: ProtoUDP, dport: 53}
	for i := 0; i < 10000; i++ {
		flood.sport = uint16(i)
		e.FromPod(flood.bytes())
		if n := e.Tracker().Len(); n > cfg.PodShare {
			t.Fatalf("after %d flows the table holds %d, more than a pod's share %d", i+1, n, cfg.PodShare)
		}
	}
	if got := e.Snapshot().Pod(client).owner.Owned(); got != cfg.PodShare {
		t.Errorf("client's connections = %d, want its share %d", got, cfg.PodShare)
	}
	for i := 0; i < cfg.PodShare; i++ {
		p := packet{src: web, dst: endpoints["ext"].v4, proto: ProtoTCP, sport: uint16(i), dport: 443, flags: tcpSyn}
		if !e.FromPod(p.bytes()) {
			t.Fatalf("web's connection %d refused while client floods", i)
		}
	}
}

// TestReopen checks that a SYN on the tuple of a closed connection opens
// it again: the established timeout, not the closing one, once answered.
func TestReopen(t *testing.T) {
	e, clock := enforcer(t, DefaultTrackerConfig, isolateClient...)
	out := packet{src: endpoints["client"].v4, dst: endpoints["db"].v4, proto: ProtoTCP, sport: 1, dport: 5432}
	back := out.reply()
	for _, step := range []struct {
		p     packet
		flags uint8
	}{{out, tcpSyn}, {back, tcpSyn | tcpAck}, {out, tcpFin | tcpAck}, {back, tcpFin | tcpAck}, {out, tcpSyn}, {back, tcpSyn | tcpAck}} {
		step.p.flags = step.flags
		if !e.FromPod(step.p.bytes()) {
			t.Fatalf("%+v denied", step.p)
		}
	}
	*clock += int64(DefaultTrackerConfig.TCPClosing) + 1
	e.Tracker().Expire()
	if got := e.Tracker().Len(); got != 1 {
		t.Errorf("the reopened connection expired with the closing timeout (%d tracked)", got)
	}
}

// TestRemoteEgress: a pod of another node that policy isolates for egress
// meets its egress rules where its connection reaches a local pod (a
// Service connection, which its own node's router saw only toward the
// Service address); the replies to a local pod's connection to it pass.
func TestRemoteEgress(t *testing.T) {
	// far (dev, app=tool, node n2) may send to dev's web pods (dweb) on
	// TCP 80 only.
	pol := netpol("dev", "tool", sel("app", "tool"), egressOnly, nil,
		to(ports(tcpPort(80)), podPeer(sel("app", "web"), nil)))
	e, err := NewEnforcer(DefaultTrackerConfig, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.Set(Compile(clusterInput(pol), nil))
	far := endpoints["far"].v4
	for _, c := range []struct {
		dst  string
		port uint16
		want bool
	}{
		{"dweb", 80, true},
		{"dweb", 8080, false},
		{"web", 80, false},
		{"db", 5432, false},
	} {
		syn := packet{src: far, dst: endpoints[c.dst].v4, proto: ProtoTCP, sport: 40000 + c.port, dport: c.port, flags: tcpSyn}
		if got := e.FromUplink(syn.bytes()); got != c.want {
			t.Errorf("far -> %s:%d from the uplink: passed %v, want %v", c.dst, c.port, got, c.want)
		}
	}
	// db, not isolated, connects to far: far's answer passes, though
	// far's egress rules would not let it open a connection to db.
	syn := packet{src: endpoints["db"].v4, dst: far, proto: ProtoTCP, sport: 41000, dport: 9000, flags: tcpSyn}
	if !e.FromPod(syn.bytes()) {
		t.Fatal("db -> far denied")
	}
	if !e.FromUplink(syn.reply().bytes()) {
		t.Error("far's SYN-ACK to db's connection denied")
	}
}
