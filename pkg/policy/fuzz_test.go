package policy

import (
	"fmt"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// bytesReader hands out a fuzz input byte by byte, zeros once it is used
// up.
type bytesReader struct{ b []byte }

func (r *bytesReader) byte() byte {
	if len(r.b) == 0 {
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *bytesReader) pick(n int) int { return int(r.byte()) % n }

func (r *bytesReader) u16() uint16 { return uint16(r.byte())<<8 | uint16(r.byte()) }

// addr returns an address from a small pool (so that pods, blocks and
// probes meet) or, one time in eight, anywhere.
func (r *bytesReader) addr(v6 bool) netip.Addr {
	if r.pick(8) == 0 {
		if v6 {
			var b [16]byte
			for i := range b {
				b[i] = r.byte()
			}
			return netip.AddrFrom16(b)
		}
		return netip.AddrFrom4([4]byte{r.byte(), r.byte(), r.byte(), r.byte()})
	}
	if v6 {
		return netip.AddrFrom16([16]byte{0: 0xfd, 15: r.byte() % 16})
	}
	return netip.AddrFrom4([4]byte{10, 0, 0, r.byte() % 16})
}

// FuzzTable checks the sweep: a table built from arbitrary ranges and port
// sets answers as the ranges themselves do, at and around every boundary.
func FuzzTable(f *testing.F) {
	f.Add([]byte{0, 0, 24, 1, 6, 0, 80, 0, 90, 1, 3, 96, 0})
	f.Add([]byte{3, 1, 8, 0, 2, 200, 4, 1, 17, 0, 53, 0, 53})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &bytesReader{data}
		var items []item
		for n := r.pick(8) + 1; n > 0; n-- {
			v6 := r.pick(2) == 1
			a := r.addr(v6)
			p := netip.PrefixFrom(a, r.pick(a.BitLen()+1))
			rg := prefixRange(p)
			if r.pick(3) == 0 { // an except cut out of it
				cut := prefixRange(netip.PrefixFrom(r.addr(v6), r.pick(a.BitLen()+1)))
				for _, piece := range rg.subtract(cut) {
					items = append(items, item{r: piece, ports: randomPorts(r)})
				}
				continue
			}
			items = append(items, item{r: rg, ports: randomPorts(r)})
		}
		tb := buildTable(items)
		checkSpans(t, tb)
		var probes []netip.Addr
		for _, it := range items {
			for _, n := range []u128{it.r.lo, it.r.hi, it.r.lo.dec(), it.r.hi.inc()} {
				probes = append(probes, numAddr(n, it.r.v6))
			}
		}
		for _, a := range probes {
			if !a.IsValid() {
				continue
			}
			for _, proto := range []uint8{ProtoTCP, ProtoUDP, ProtoSCTP, ProtoICMP} {
				for _, port := range []uint16{0, 1, 53, 80, 81, 1000, 65535} {
					hasPort := proto != ProtoICMP
					want := false
					for _, it := range items {
						if it.r.contains(a) && it.ports.allows(proto, port, hasPort) {
							want = true
						}
					}
					if got := tb.Allows(a, proto, port, hasPort); got != want {
						t.Fatalf("Allows(%s, %d, %d) = %v, want %v", a, proto, port, got, want)
					}
				}
			}
		}
	})
}

// numAddr is addrNum's inverse; an invalid Addr outside the family.
func numAddr(n u128, v6 bool) netip.Addr {
	if !v6 {
		if n.hi != 0 || n.lo > 0xffffffff {
			return netip.Addr{}
		}
		return netip.AddrFrom4([4]byte{byte(n.lo >> 24), byte(n.lo >> 16), byte(n.lo >> 8), byte(n.lo)})
	}
	var b [16]byte
	for i := 0; i < 8; i++ {
		b[7-i] = byte(n.hi >> (8 * i))
		b[15-i] = byte(n.lo >> (8 * i))
	}
	return netip.AddrFrom16(b)
}

func randomPorts(r *bytesReader) *portSet {
	if r.pick(4) == 0 {
		return &portSet{all: true}
	}
	var s portSet
	for n := r.pick(3) + 1; n > 0; n-- {
		proto := []uint8{ProtoTCP, ProtoUDP, ProtoSCTP}[r.pick(3)]
		lo := []uint16{1, 53, 80, 1000}[r.pick(4)]
		hi := lo + uint16(r.pick(30))
		s.ranges = append(s.ranges, portRange{proto: proto, lo: lo, hi: hi})
	}
	u := union(&s)
	return &u
}

// checkSpans checks a table's invariants: spans sorted, disjoint, within
// their family, each with a valid port set.
func checkSpans(t *testing.T, tb *Table) {
	t.Helper()
	for fam, spans := range [][]span{tb.v4, tb.v6} {
		for i, s := range spans {
			if s.hi.less(s.lo) || int(s.set) >= len(tb.sets) || s.set < 0 {
				t.Fatalf("family %d span %d: %+v (of %d sets)", fam, i, s, len(tb.sets))
			}
			if fam == 0 && (s.hi.hi != 0 || s.hi.lo > 0xffffffff) {
				t.Fatalf("IPv4 span %d beyond 32 bits: %+v", i, s)
			}
			if i > 0 && !spans[i-1].hi.less(s.lo) {
				t.Fatalf("family %d spans %d and %d overlap or are out of order: %+v %+v", fam, i-1, i, spans[i-1], s)
			}
		}
	}
}

// fuzzInput builds a cluster from a fuzz input: pods, namespaces and
// policies with every field drawn from it, invalid selectors, CIDRs,
// protocols and ports included.
func fuzzInput(r *bytesReader) Input {
	nss := []string{"a", "b", "c"}
	vals := []string{"x", "y", ""}
	in := Input{NodeName: "n1", NodeAddrs: []netip.Addr{netip.MustParseAddr("10.0.9.1"), netip.MustParseAddr("fd09::1")}}
	for _, n := range nss {
		in.Namespaces = append(in.Namespaces, namespace(n, "team", vals[r.pick(3)]))
	}
	for i := r.pick(8); i > 0; i-- {
		var addrs []netip.Addr
		switch r.pick(4) {
		case 0:
			addrs = []netip.Addr{r.addr(false)}
		case 1:
			addrs = []netip.Addr{r.addr(true)}
		case 2:
			addrs = []netip.Addr{r.addr(false), r.addr(true)}
		}
		p := pod(nss[r.pick(3)], fmt.Sprintf("p%d", i), labelMap("app", vals[r.pick(3)]), addrs,
			containerPort{[]string{"http", "dns"}[r.pick(2)], []corev1.Protocol{"TCP", "UDP", "SCTP", "bogus"}[r.pick(4)], int32(r.u16())})
		if r.pick(4) == 0 {
			p.Spec.NodeName = "n2"
		}
		if r.pick(8) == 0 {
			p.Spec.HostNetwork = true
		}
		if r.pick(8) == 0 {
			p.Status.PodIPs = []corev1.PodIP{{IP: "garbage"}}
		}
		in.Pods = append(in.Pods, p)
	}
	selector := func() *metav1.LabelSelector {
		switch r.pick(5) {
		case 0:
			return nil
		case 1:
			return &metav1.LabelSelector{}
		case 2: // invalid: In without values
			return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: metav1.LabelSelectorOpIn}}}
		case 3:
			return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: "app", Operator: []metav1.LabelSelectorOperator{"In", "NotIn", "Exists", "DoesNotExist", "Bogus"}[r.pick(5)], Values: []string{vals[r.pick(3)]}}}}
		}
		return sel("app", vals[r.pick(3)])
	}
	cidr := func() string {
		switch r.pick(4) {
		case 0:
			return "nonsense"
		case 1:
			return netip.PrefixFrom(r.addr(true), r.pick(129)).String()
		}
		return netip.PrefixFrom(r.addr(false), r.pick(33)).String()
	}
	peersOf := func() []networkingv1.NetworkPolicyPeer {
		var out []networkingv1.NetworkPolicyPeer
		for n := r.pick(3); n > 0; n-- {
			if r.pick(3) == 0 {
				b := &networkingv1.IPBlock{CIDR: cidr()}
				for m := r.pick(3); m > 0; m-- {
					b.Except = append(b.Except, cidr())
				}
				out = append(out, networkingv1.NetworkPolicyPeer{IPBlock: b})
				continue
			}
			out = append(out, podPeer(selector(), selector()))
		}
		return out
	}
	portsOf := func() []networkingv1.NetworkPolicyPort {
		var out []networkingv1.NetworkPolicyPort
		for n := r.pick(3); n > 0; n-- {
			proto := []corev1.Protocol{"TCP", "UDP", "SCTP", "", "ICMP"}[r.pick(5)]
			p := networkingv1.NetworkPolicyPort{Protocol: &proto}
			switch r.pick(4) {
			case 0:
			case 1:
				v := intstr.FromString([]string{"http", "dns", "none"}[r.pick(3)])
				p.Port = &v
			default:
				v := intstr.FromInt32(int32(int16(r.u16())))
				p.Port = &v
				if r.pick(2) == 0 {
					end := int32(int16(r.u16()))
					p.EndPort = &end
				}
			}
			out = append(out, p)
		}
		return out
	}
	for i := r.pick(5); i > 0; i-- {
		s := selector()
		if s == nil {
			s = &metav1.LabelSelector{}
		}
		var types []networkingv1.PolicyType
		for _, t := range []networkingv1.PolicyType{"Ingress", "Egress"} {
			if r.pick(2) == 0 {
				types = append(types, t)
			}
		}
		var ing []networkingv1.NetworkPolicyIngressRule
		var eg []networkingv1.NetworkPolicyEgressRule
		for n := r.pick(3); n > 0; n-- {
			ing = append(ing, networkingv1.NetworkPolicyIngressRule{From: peersOf(), Ports: portsOf()})
		}
		for n := r.pick(3); n > 0; n-- {
			eg = append(eg, networkingv1.NetworkPolicyEgressRule{To: peersOf(), Ports: portsOf()})
		}
		in.Policies = append(in.Policies, netpol(nss[r.pick(3)], fmt.Sprintf("np%d", i), s, types, ing, eg))
	}
	return in
}

// FuzzCompile compiles arbitrary clusters: no panic, every table well
// formed, the same verdicts from a second compilation, the node always let
// in, and everything allowed once a policy allowing everything is added
// in every namespace (the union only adds).
func FuzzCompile(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30})
	f.Add([]byte("\x02\x01\x00\x07\x01\x02\x03\x00\x01\x04\x04\x01\x02\x02\x01\x00\x00\x02\x01\x05\x01\x03\x02\x02\x01\x01\x01\x00\x50\x02"))
	f.Fuzz(func(t *testing.T, data []byte) {
		in := fuzzInput(&bytesReader{data})
		s1 := Compile(in, nil)
		s2 := Compile(in, s1)
		for _, p := range s1.Pods() {
			for d := range p.tables {
				if tb := p.tables[d]; tb != nil {
					checkSpans(t, tb)
				}
			}
		}
		var addrs []netip.Addr
		for _, p := range in.Pods {
			for _, ip := range p.Status.PodIPs {
				if a, err := netip.ParseAddr(ip.IP); err == nil {
					addrs = append(addrs, a)
				}
			}
		}
		addrs = append(addrs, netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1"))
		open := in
		open.Policies = append([]*networkingv1.NetworkPolicy(nil), in.Policies...)
		for _, n := range []string{"a", "b", "c"} {
			open.Policies = append(open.Policies, netpol(n, "open", sel(),
				[]networkingv1.PolicyType{"Ingress", "Egress"},
				[]networkingv1.NetworkPolicyIngressRule{{}}, []networkingv1.NetworkPolicyEgressRule{{}}))
		}
		s3 := Compile(open, s2)
		for _, src := range addrs {
			for _, dst := range append(addrs, in.NodeAddrs...) {
				if src.Is4() != dst.Is4() {
					continue
				}
				for _, pr := range probes {
					proto := pr.proto
					if proto == 0 {
						proto = ProtoICMP
					}
					a1, a2 := s1.Allows(src, dst, proto, pr.port), s2.Allows(src, dst, proto, pr.port)
					if a1 != a2 {
						t.Fatalf("%s -> %s %s: %v, then %v recompiled", src, dst, pr.name, a1, a2)
					}
					if !s3.Allows(src, dst, proto, pr.port) {
						t.Fatalf("%s -> %s %s denied with an allow-all policy in every namespace", src, dst, pr.name)
					}
				}
			}
			for _, node := range in.NodeAddrs {
				if node.Is4() != src.Is4() {
					continue
				}
				for _, pr := range probes[:1] {
					if !s1.Allows(node, src, ProtoTCP, pr.port) && s1.Pod(src) != nil && s1.Pod(src).tables[Egress] == nil {
						t.Fatalf("node %s -> pod %s denied", node, src)
					}
				}
			}
		}
	})
}

// FuzzTracker floods the tracker with arbitrary new flows from one pod and
// feeds the enforcer arbitrary bytes: no panic, the table bounded, the
// flooding pod held to its share, and another pod's share intact.
func FuzzTracker(f *testing.F) {
	f.Add([]byte{0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 12, 10, 0, 0, 11, 1, 2, 0x15, 0x38}, uint16(500))
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 58, 64}, uint16(3000))
	// Fragments (frag.go): a first one, a later one.
	f.Add(packet{src: endpoints["client"].v4, dst: endpoints["db"].v4, proto: ProtoUDP, sport: 1, dport: 53, more: true, fragID: 9}.bytes(), uint16(20))
	f.Add(packet{src: endpoints["client"].v6, dst: endpoints["db"].v6, proto: ProtoUDP, fragOff: 185, fragID: 9}.bytes(), uint16(20))
	f.Fuzz(func(t *testing.T, data []byte, flows uint16) {
		cfg := DefaultTrackerConfig
		cfg.MaxConns, cfg.PodShare = 256, 32
		in := clusterInput(netpol("prod", "all", sel(), []networkingv1.PolicyType{"Ingress", "Egress"},
			[]networkingv1.NetworkPolicyIngressRule{{}}, []networkingv1.NetworkPolicyEgressRule{{}}))
		e, err := NewEnforcer(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		e.Set(Compile(in, nil))
		// Arbitrary bytes, from a pod and from the uplink, as they come
		// and as the quote of an ICMP error.
		ParseFlow(data)
		e.FromUplink(data)
		e.FromPod(data)
		e.FromPod(packet{src: endpoints["client"].v4, dst: endpoints["db"].v4, proto: ProtoICMP, typ: 3, quote: data}.bytes())
		e.FromPod(packet{src: endpoints["client"].v6, dst: endpoints["db"].v6, proto: ProtoICMPv6, typ: 1, quote: data}.bytes())
		before := e.Tracker().Len()

		r := &bytesReader{data}
		client := e.Snapshot().Pod(endpoints["client"].v4).owner
		for i := 0; i < int(flows); i++ {
			v6 := r.pick(2) == 1
			src := endpoints["client"].v4
			if v6 {
				src = endpoints["client"].v6
			}
			p := packet{src: src, dst: r.addr(v6), proto: []uint8{ProtoTCP, ProtoUDP, ProtoSCTP, icmpFor(src)}[r.pick(4)],
				sport: uint16(i), dport: r.u16(), flags: r.byte(), typ: []uint8{8, 128, 0, 129}[r.pick(4)], id: uint16(i)}
			e.FromPod(p.bytes())
			if n := e.Tracker().Len(); n > cfg.MaxConns {
				t.Fatalf("table holds %d, more than %d", n, cfg.MaxConns)
			}
			if n := client.Owned(); n > cfg.PodShare {
				t.Fatalf("client holds %d, more than its share %d", n, cfg.PodShare)
			}
		}
		if before+cfg.PodShare+cfg.PodShare > cfg.MaxConns {
			return // the bytes above took others' room: nothing to check
		}
		web := endpoints["web"].v4
		for i := 0; i < cfg.PodShare-before; i++ {
			p := packet{src: web, dst: endpoints["ext"].v4, proto: ProtoTCP, sport: uint16(i), dport: 443, flags: tcpSyn}
			if !e.FromPod(p.bytes()) {
				t.Fatalf("web's connection %d refused after client's flood (%d tracked)", i, e.Tracker().Len())
			}
		}
	})
}
