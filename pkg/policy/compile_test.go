package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// The truth table's cluster: three namespaces, six pods on this node ("n1")
// and one on another, addresses outside the cluster and the node's own.
type endpointAddrs struct{ v4, v6 netip.Addr }

var endpoints = map[string]endpointAddrs{
	"web":    {netip.MustParseAddr("10.0.0.10"), netip.MustParseAddr("fd00::10")},
	"db":     {netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("fd00::11")},
	"client": {netip.MustParseAddr("10.0.0.12"), netip.MustParseAddr("fd00::12")},
	"dweb":   {netip.MustParseAddr("10.0.1.10"), netip.MustParseAddr("fd00:1::10")},
	"tool":   {netip.MustParseAddr("10.0.1.11"), netip.MustParseAddr("fd00:1::11")},
	"x":      {netip.MustParseAddr("10.0.2.10"), netip.MustParseAddr("fd00:2::10")},
	"far":    {netip.MustParseAddr("10.0.3.10"), netip.MustParseAddr("fd00:3::10")},
	"ext":    {netip.MustParseAddr("192.0.2.5"), netip.MustParseAddr("2001:db8::5")},
	"exc":    {netip.MustParseAddr("192.0.2.200"), netip.MustParseAddr("2001:db8::200")},
	"node":   {netip.MustParseAddr("10.0.9.1"), netip.MustParseAddr("fd00:9::1")},
}

// egressFrom reports whether src's egress rules judge its connection to
// dst here, when a policy selects the local pods selected and the remote
// pod far, which has tool's labels: a local pod's always, far's when dst
// is a local pod (a Service connection its own node could not judge).
func egressFrom(src, dst string, selected ...string) bool {
	return in(src, selected...) || (src == "far" && slices.Contains(selected, "tool") && in(dst, "web", "db", "client", "dweb", "tool", "x"))
}

func both(name string) []netip.Addr {
	e := endpoints[name]
	return []netip.Addr{e.v4, e.v6}
}

var (
	http80   = containerPort{"http", corev1.ProtocolTCP, 80}
	metrics  = containerPort{"metrics", corev1.ProtocolTCP, 9090}
	pg       = containerPort{"pg", corev1.ProtocolTCP, 5432}
	http8080 = containerPort{"http", corev1.ProtocolTCP, 8080}
)

func clusterInput(pols ...*networkingv1.NetworkPolicy) Input {
	far := pod("dev", "far", labelMap("app", "tool"), both("far"))
	far.Spec.NodeName = "n2"
	return Input{
		NodeName:   "n1",
		NodeAddrs:  both("node"),
		Namespaces: []*corev1.Namespace{namespace("prod", "team", "a"), namespace("dev", "team", "b"), namespace("other")},
		Pods: []*corev1.Pod{
			pod("prod", "web", labelMap("app", "web"), both("web"), http80, metrics),
			pod("prod", "db", labelMap("app", "db"), both("db"), pg),
			pod("prod", "client", labelMap("app", "client"), both("client")),
			pod("dev", "dweb", labelMap("app", "web"), both("dweb"), http8080),
			pod("dev", "tool", labelMap("app", "tool"), both("tool")),
			pod("other", "x", labelMap("app", "x"), both("x")),
			far,
		},
		Policies: pols,
	}
}

// probes are the connections tried between every two endpoints.
var probes = []struct {
	name  string
	proto uint8
	port  uint16
}{
	{"tcp/80", ProtoTCP, 80}, {"tcp/8080", ProtoTCP, 8080}, {"tcp/5432", ProtoTCP, 5432},
	{"tcp/1005", ProtoTCP, 1005}, {"tcp/9090", ProtoTCP, 9090}, {"udp/53", ProtoUDP, 53},
	{"sctp/80", ProtoSCTP, 80}, {"icmp", 0, 0},
}

func in(s string, set ...string) bool { return slices.Contains(set, s) }

// local are the pods with tables (on n1); an isolated destination among
// them admits the node always.
var prodPods = []string{"web", "db", "client"}

// TestTruthTable compiles policy sets and checks, for every pair of
// endpoints and every probe, in IPv4 and IPv6, that exactly the connections
// the want function names are allowed.
func TestTruthTable(t *testing.T) {
	cases := []struct {
		name string
		pols []*networkingv1.NetworkPolicy
		// want says whether src may open probe to dst.
		want func(src, dst, probe string) bool
	}{
		{"no policy", nil, func(src, dst, probe string) bool { return true }},
		{"default deny ingress in a namespace",
			[]*networkingv1.NetworkPolicy{netpol("prod", "deny", sel(), ingressOnly, nil, nil)},
			func(src, dst, probe string) bool { return !in(dst, prodPods...) || src == "node" }},
		{"named port from a pod selector",
			[]*networkingv1.NetworkPolicy{netpol("prod", "web", sel("app", "web"), nil,
				from(ports(namedPort("http")), podPeer(sel("app", "client"), nil)), nil)},
			func(src, dst, probe string) bool {
				return dst != "web" || src == "node" || (src == "client" && probe == "tcp/80")
			}},
		{"namespace selector",
			[]*networkingv1.NetworkPolicy{netpol("prod", "db", sel("app", "db"), ingressOnly,
				from(ports(tcpPort(5432)), podPeer(nil, sel("team", "b"))), nil)},
			func(src, dst, probe string) bool {
				return dst != "db" || src == "node" || (in(src, "dweb", "tool", "far") && probe == "tcp/5432")
			}},
		{"pod and namespace selector together, every port",
			[]*networkingv1.NetworkPolicy{netpol("prod", "db", sel("app", "db"), ingressOnly,
				from(nil, podPeer(sel("app", "tool"), sel("team", "b"))), nil)},
			func(src, dst, probe string) bool { return dst != "db" || in(src, "node", "tool", "far") }},
		{"ipBlock with except",
			[]*networkingv1.NetworkPolicy{netpol("prod", "client", sel("app", "client"), egressOnly, nil,
				to(nil, blockPeer("192.0.2.0/24", "192.0.2.200/32"), blockPeer("2001:db8::/64", "2001:db8::200/128")))},
			func(src, dst, probe string) bool { return src != "client" || dst == "ext" }},
		{"endPort range and UDP",
			[]*networkingv1.NetworkPolicy{netpol("dev", "tool", sel("app", "tool"), egressOnly, nil,
				to(ports(tcpRange(1000, 1010), udpPort(53))))},
			func(src, dst, probe string) bool {
				return !egressFrom(src, dst, "tool") || in(probe, "tcp/1005", "udp/53")
			}},
		{"egress named port resolved per destination pod",
			[]*networkingv1.NetworkPolicy{netpol("dev", "tool", sel("app", "tool"), egressOnly, nil,
				to(ports(namedPort("http")), podPeer(sel(), sel())))},
			func(src, dst, probe string) bool {
				return !egressFrom(src, dst, "tool") || (dst == "web" && probe == "tcp/80") || (dst == "dweb" && probe == "tcp/8080")
			}},
		{"ingress named port resolved against the selected pod",
			[]*networkingv1.NetworkPolicy{netpol("dev", "web", sel("app", "web"), ingressOnly,
				from(ports(namedPort("http"))), nil)},
			func(src, dst, probe string) bool { return dst != "dweb" || src == "node" || probe == "tcp/8080" }},
		{"a policy selecting no pod",
			[]*networkingv1.NetworkPolicy{netpol("prod", "nobody", sel("app", "nothing"), ingressOnly, nil, nil)},
			func(src, dst, probe string) bool { return true }},
		{"two policies: the union",
			[]*networkingv1.NetworkPolicy{
				netpol("prod", "web-client", sel("app", "web"), ingressOnly,
					from(ports(tcpPort(80)), podPeer(sel("app", "client"), nil)), nil),
				netpol("prod", "web-dns", sel("app", "web"), ingressOnly,
					from(ports(udpPort(53)), podPeer(nil, sel("team", "b"))), nil),
			},
			func(src, dst, probe string) bool {
				return dst != "web" || src == "node" || (src == "client" && probe == "tcp/80") ||
					(in(src, "dweb", "tool", "far") && probe == "udp/53")
			}},
		{"SCTP from everywhere",
			[]*networkingv1.NetworkPolicy{netpol("other", "x", sel(), ingressOnly, from(ports(sctpPort(80))), nil)},
			func(src, dst, probe string) bool { return dst != "x" || src == "node" || probe == "sctp/80" }},
		{"default deny egress in a namespace",
			[]*networkingv1.NetworkPolicy{netpol("dev", "deny", sel(), egressOnly, nil, nil)},
			func(src, dst, probe string) bool { return !egressFrom(src, dst, "dweb", "tool") }},
		{"both directions open to everything",
			[]*networkingv1.NetworkPolicy{netpol("prod", "db", sel("app", "db"),
				[]networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
				[]networkingv1.NetworkPolicyIngressRule{{}}, []networkingv1.NetworkPolicyEgressRule{{}})},
			func(src, dst, probe string) bool { return true }},
		{"both directions closed",
			[]*networkingv1.NetworkPolicy{netpol("prod", "db", sel("app", "db"),
				[]networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}, nil, nil)},
			func(src, dst, probe string) bool { return src != "db" && (dst != "db" || src == "node") }},
		{"egress rules without policyTypes restrict egress only",
			[]*networkingv1.NetworkPolicy{netpol("prod", "web", sel("app", "web"), nil,
				[]networkingv1.NetworkPolicyIngressRule{{}}, to(ports(tcpPort(5432)), podPeer(sel("app", "db"), nil)))},
			func(src, dst, probe string) bool { return src != "web" || (dst == "db" && probe == "tcp/5432") }},
	}
	names := make([]string, 0, len(endpoints))
	for n := range endpoints {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, tc := range cases {
		snap := Compile(clusterInput(tc.pols...), nil)
		if p := snap.Problems(); len(p) != 0 {
			t.Errorf("%s: problems: %v", tc.name, p)
		}
		for _, fam := range []string{"IPv4", "IPv6"} {
			t.Run(tc.name+"/"+fam, func(t *testing.T) {
				var wrong []string
				allowed, denied := 0, 0
				for _, src := range names {
					for _, dst := range names {
						if src == dst {
							continue
						}
						sa, da := endpoints[src].v4, endpoints[dst].v4
						icmp := uint8(ProtoICMP)
						if fam == "IPv6" {
							sa, da, icmp = endpoints[src].v6, endpoints[dst].v6, ProtoICMPv6
						}
						for _, p := range probes {
							proto := p.proto
							if proto == 0 {
								proto = icmp
							}
							got, want := snap.Allows(sa, da, proto, p.port), tc.want(src, dst, p.name)
							if got != want {
								wrong = append(wrong, fmt.Sprintf("%s->%s %s: got %v, want %v", src, dst, p.name, got, want))
							}
							if want {
								allowed++
							} else {
								denied++
							}
						}
					}
				}
				if len(wrong) > 0 {
					t.Errorf("%d of %d verdicts wrong:\n%s", len(wrong), allowed+denied, strings.Join(wrong, "\n"))
				}
			})
		}
	}
}

// TestUnisolated checks that a pod no policy selects has no table, and one
// selected has the selecting policies named.
func TestUnisolated(t *testing.T) {
	snap := Compile(clusterInput(
		netpol("prod", "deny", sel(), ingressOnly, nil, nil),
		netpol("prod", "web", sel("app", "web"), egressOnly, nil, nil)), nil)
	web := snap.Pod(endpoints["web"].v6)
	if web == nil || web.Name != "web" {
		t.Fatalf("Pod(web) = %v", web)
	}
	if got, want := web.Policies(Ingress), []string{"prod/deny"}; !slices.Equal(got, want) {
		t.Errorf("web ingress policies = %v, want %v", got, want)
	}
	if got, want := web.Policies(Egress), []string{"prod/web"}; !slices.Equal(got, want) {
		t.Errorf("web egress policies = %v, want %v", got, want)
	}
	if tb := snap.Pod(endpoints["db"].v4).Table(Egress); tb != nil {
		t.Errorf("db egress table = %v, want nil (not isolated)", tb)
	}
	if p := snap.Pod(endpoints["far"].v4); p != nil {
		t.Errorf("remote pod far has a table: %v", p)
	}
	if got := len(snap.Pods()); got != 6 {
		t.Errorf("local pods = %d, want 6", got)
	}
}

// TestProblems checks that invalid input is skipped and reported, and
// that an invalid except skips its block (denying less would open more).
func TestProblems(t *testing.T) {
	bad := netpol("prod", "bad", sel("app", "client"), egressOnly, nil,
		to(nil, blockPeer("192.0.2.0/24", "not-a-cidr"), blockPeer("10.0.0.0/8")))
	snap := Compile(clusterInput(bad), nil)
	if len(snap.Problems()) != 1 {
		t.Errorf("problems = %v, want one", snap.Problems())
	}
	c := endpoints["client"].v4
	if snap.Allows(c, endpoints["ext"].v4, ProtoTCP, 80) {
		t.Errorf("client -> ext allowed through a block with an invalid except")
	}
	if !snap.Allows(c, endpoints["web"].v4, ProtoTCP, 80) {
		t.Errorf("client -> web denied, want allowed by 10.0.0.0/8")
	}
}

// TestOwnersCarryOver checks that a recompiled snapshot keeps a pod's
// counters and tracker share.
func TestOwnersCarryOver(t *testing.T) {
	a := Compile(clusterInput(netpol("prod", "deny", sel(), ingressOnly, nil, nil)), nil)
	b := Compile(clusterInput(), a)
	if a.Generation() >= b.Generation() {
		t.Errorf("generations %d then %d, want increasing", a.Generation(), b.Generation())
	}
	w := endpoints["web"].v4
	if a.Pod(w).owner != b.Pod(w).owner {
		t.Errorf("web's owner changed across snapshots")
	}
}
