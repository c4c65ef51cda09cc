package e2e

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// hostFirewall is a host firewall whose forward policy drops, as Docker,
// hardened hosts and some distributions leave it.
type hostFirewall struct {
	name string
	// agentEnv runs the agent with this environment (the iptables command
	// hidden from it, as in the agent's image).
	agentEnv []string
	// setup makes the host's forward path drop.
	setup []string
	// remove is what another program might do to the agent's rules later
	// (a firewall reload, Docker's restart).
	remove []string
	// dump lists the host's whole firewall.
	dump []string
	// open lets forwarded traffic through again.
	open []string
	// untouched list chains whose policy accepts, where the agent must
	// put nothing.
	untouched []string
}

// sh runs each shell line in x or fails t.
func sh(t *testing.T, ctx context.Context, x ns.NetNS, lines ...string) string {
	t.Helper()
	var all strings.Builder
	for _, l := range lines {
		out, err := node.Run(ctx, x, "sh", "-c", l)
		if err != nil {
			t.Fatal(err)
		}
		all.WriteString(out)
	}
	return all.String()
}

// TestForwardPolicyDrop is the issue "pod egress on a host whose firewall
// drops forwarded traffic": two nodes whose hosts drop forwarded traffic
// (iptables' FORWARD policy DROP with a Docker-style DOCKER-USER chain that
// drops what comes from the outside interface; an nftables forward chain
// with policy drop; iptables-nft's FORWARD reached without the iptables
// command, as from the agent's image). Pods reach the outside (masqueraded)
// and the other node's pods, both families; traffic from one outside
// network to another through the host is still dropped; rules another
// program removes are put back; once the agent stopped, none of its rules
// is left and the host's own are untouched.
func TestForwardPolicyDrop(t *testing.T) {
	testutil.RequireRoot(t)
	for _, c := range []string{"iptables", "ip6tables", "iptables-save", "nft"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("no %s command (hack/deps.sh installs iptables and nftables)", c)
		}
	}
	noIPTables := t.TempDir() // a PATH without iptables
	for _, fw := range []hostFirewall{{
		name: "iptables",
		setup: []string{
			"iptables -P FORWARD DROP", "ip6tables -P FORWARD DROP",
			// Docker's chain, with the drop its documentation suggests
			// for traffic from outside (which would drop pod replies).
			"iptables -N DOCKER-USER", "iptables -A DOCKER-USER -i out0 -j DROP", "iptables -I FORWARD -j DOCKER-USER",
		},
		remove: []string{
			"iptables -F SHM-CNI-FORWARD",
			// Docker restarting puts its jump first again.
			"iptables -D FORWARD -j DOCKER-USER", "iptables -I FORWARD 1 -j DOCKER-USER",
			"ip6tables -D FORWARD 1",
		},
		dump: []string{"iptables-save", "ip6tables-save", "nft list ruleset"},
		open: []string{"iptables -F DOCKER-USER", "iptables -P FORWARD ACCEPT", "ip6tables -P FORWARD ACCEPT"},
	}, {
		name: "nftables",
		setup: []string{"nft add table inet hostfw", "nft 'add chain inet hostfw forward { type filter hook forward priority 0; policy drop; }'",
			// Another program's rule set at the forward hook that
			// accepts by default (kube-proxy's nftables mode): its
			// rules must keep seeing pod traffic.
			"nft add table ip other", "nft 'add chain ip other forward { type filter hook forward priority 10; policy accept; }'",
			"nft add rule ip other forward counter",
			// kube-proxy's iptables mode: FORWARD accepts by default
			// and holds another program's rules.
			"iptables -N KUBE-FORWARD", "iptables -A FORWARD -j KUBE-FORWARD"},
		remove:    []string{"nft flush chain inet hostfw forward"},
		dump:      []string{"nft list ruleset", "iptables-save", "ip6tables-save"},
		open:      []string{"nft delete table inet hostfw"},
		untouched: []string{"nft list chain ip other forward", "iptables -S"},
	}, {
		name:     "iptables-nft without the command",
		agentEnv: []string{"PATH=" + noIPTables},
		setup:    []string{"iptables -P FORWARD DROP", "ip6tables -P FORWARD DROP"},
		remove:   []string{"iptables -F FORWARD"},
		dump:     []string{"nft list ruleset", "iptables-save", "ip6tables-save"},
		open:     []string{"iptables -P FORWARD ACCEPT", "ip6tables -P FORWARD ACCEPT"},
	}} {
		t.Run(fw.name, func(t *testing.T) { testForwardPolicyDrop(t, fw) })
	}
}

func testForwardPolicyDrop(t *testing.T, fw hostFirewall) {
	ctx := testContext(t)
	args := []string{"--cluster-cidr=" + clusterCIDRs, "--host-check-interval=300ms"}
	a := newNode(t, node.Options{DeferAgent: true, AgentEnv: fw.agentEnv,
		ExtraAgentArgs: append(args[:2:2], peerRoutes(nodeBPodCIDRs, hostB))})
	b := newNode(t, node.Options{DeferAgent: true, AgentEnv: fw.agentEnv, PodCIDRs: nodeBPodCIDRs,
		ExtraAgentArgs: append(args[:2:2], peerRoutes(a.PodCIDRs(), hostA))})
	if err := joinHosts(a.Host, b.Host); err != nil {
		t.Fatal(err)
	}
	other := otherOutside(t, ctx, a)
	for _, n := range []*node.Node{a, b} {
		sh(t, ctx, n.Host, fw.setup...)
	}
	before := sh(t, ctx, a.Host, fw.dump...)
	if err := probe(ctx, other, a.Outside, node.Outside4.Addr()); err == nil {
		t.Fatal("before the agent: outside to outside through the host passed; want the host's firewall to drop it")
	}
	for _, n := range []*node.Node{a, b} {
		if err := n.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ka, sa := addPod(t, ctx, a, "ka", node.KindTap), addPod(t, ctx, a, "sa", node.KindShm)
	va := addPod(t, ctx, a, "va", node.KindVeth)
	kb := addPod(t, ctx, b, "kb", node.KindTap)

	traffic := func(t *testing.T) {
		t.Helper()
		for _, tc := range []struct {
			name     string
			n        *node.Node
			src, dst *node.Peer
			want     func(v6 bool) netip.Addr
		}{
			{"kernel pod to outside", a, a.PodPeer(ka), a.OutsidePeer(), nil},
			{"sandbox to outside", a, a.PodPeer(sa), a.OutsidePeer(), nil},
			{"kernel pod a to kernel pod b", a, a.PodPeer(ka), b.PodPeer(kb), func(v6 bool) netip.Addr { return a.PodPeer(ka).Addr(v6) }},
			{"kernel pod b to sandbox a", b, b.PodPeer(kb), a.PodPeer(sa), func(v6 bool) netip.Addr { return b.PodPeer(kb).Addr(v6) }},
			{"veth pod to outside", a, a.PodPeer(va), a.OutsidePeer(), nil},
			{"veth pod a to kernel pod b", a, a.PodPeer(va), b.PodPeer(kb), func(v6 bool) netip.Addr { return a.PodPeer(va).Addr(v6) }},
			{"kernel pod b to veth pod a", b, b.PodPeer(kb), a.PodPeer(va), func(v6 bool) netip.Addr { return b.PodPeer(kb).Addr(v6) }},
		} {
			for _, v6 := range []bool{false, true} {
				tr, err := tc.n.Transfer(ctx, tc.src, tc.dst, v6, 1<<20)
				if err != nil {
					t.Errorf("%s: %v", tc.name, err)
					continue
				}
				want := a.ExpectedSource(tc.src, tc.dst, v6)
				if tc.want != nil {
					want = tc.want(v6)
				}
				if tr.From != want {
					t.Errorf("%s %s: the receiver saw %s, want %s", tc.name, family(v6), tr.From, want)
				}
			}
		}
	}
	traffic(t)
	if err := probe(ctx, other, a.Outside, node.Outside4.Addr()); err == nil {
		t.Error("with the agent: outside to outside through the host passed; want it dropped (only pod traffic is accepted)")
	}
	for _, list := range fw.untouched {
		if out := sh(t, ctx, a.Host, list); strings.Contains(strings.ToLower(out), "shm-cni") {
			t.Errorf("the agent put rules into chains that accept by default (%s):\n%s", list, out)
		}
	}

	// Another program removes the agent's rules: the agent puts them back.
	sh(t, ctx, a.Host, fw.remove...)
	if err := waitMetric(ctx, a, "shm_cni_host_repairs_total", 1); err != nil {
		t.Fatalf("%v; firewall now:\n%s", err, sh(t, ctx, a.Host, fw.dump...))
	}
	traffic(t)

	if fw.name == "iptables" {
		// The policy back to ACCEPT: the agent takes its rules out of
		// the way of FORWARD's own; back to DROP, they return.
		gone := func() bool { return !strings.Contains(sh(t, ctx, a.Host, "ip6tables -S"), "SHM-CNI") }
		sh(t, ctx, a.Host, "ip6tables -P FORWARD ACCEPT")
		if err := waitFor(ctx, gone); err != nil {
			t.Errorf("ip6tables FORWARD policy ACCEPT: the agent's rules are still there:\n%s", sh(t, ctx, a.Host, "ip6tables -S"))
		}
		sh(t, ctx, a.Host, "ip6tables -P FORWARD DROP")
		if err := waitFor(ctx, func() bool { return !gone() }); err != nil {
			t.Errorf("ip6tables FORWARD policy DROP again: the agent's rules did not come back:\n%s", sh(t, ctx, a.Host, "ip6tables -S"))
		}
	}

	if fw.agentEnv != nil {
		// Written natively into iptables-nft's chain, the rules must
		// read back through the iptables command, comment and all.
		out := sh(t, ctx, a.Host, "iptables -S FORWARD")
		for _, want := range []string{
			`-s 10.244.0.0/24 -i shm0 -m comment --comment "shm-cni: from pods" -j ACCEPT`,
			`-s 10.244.0.0/24 -i shmv+ -m comment --comment "shm-cni: from pods on veth links" -j ACCEPT`,
		} {
			if !strings.Contains(out, want) {
				t.Errorf("iptables -S FORWARD does not show the agent's accept %s as iptables would write it:\n%s", want, out)
			}
		}
	}

	// Stopped, the agent leaves the host's firewall as it found it.
	for _, n := range []*node.Node{a, b} {
		if err := n.StopAgent(); err != nil {
			t.Fatal(err)
		}
	}
	after := sh(t, ctx, a.Host, fw.dump...)
	if strings.Contains(strings.ToLower(after), "shm-cni") {
		t.Errorf("rules of the agent's left after it stopped:\n%s", after)
	}
	if got, want := normaliseDump(after), normaliseDump(before); got != want {
		t.Errorf("the host's firewall after the agent:\n%s\nwant as before it:\n%s", got, want)
	}

	// The probe could pass: it fails above because of the firewall.
	sh(t, ctx, a.Host, fw.open...)
	if err := probe(ctx, other, a.Outside, node.Outside4.Addr()); err != nil {
		t.Errorf("with the host's firewall open, outside to outside failed: %v", err)
	}
}

// normaliseDump drops what changes between two listings of the same
// firewall: comments with dates, counters and rule handles.
func normaliseDump(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.Index(l, " ["); strings.HasPrefix(l, ":") && i > 0 {
			l = l[:i] // ":FORWARD DROP [0:0]"
		}
		l = counters.ReplaceAllString(l, "counter") // "counter packets 4 bytes 240"
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

var counters = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// otherOutside makes a second network beyond n's host, 203.0.113.0/24 on a
// veth "out1", routed to and from the outside through the host: traffic
// between the two is forwarded by the host but is nobody's pod traffic.
func otherOutside(t *testing.T, ctx context.Context, n *node.Node) ns.NetNS {
	t.Helper()
	x, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	sh(t, ctx, n.Host,
		"ip link add out1 type veth peer name eth0 netns "+x.Path(),
		"ip addr add 203.0.113.1/24 dev out1", "ip link set out1 up")
	sh(t, ctx, x, "ip addr add 203.0.113.2/24 dev eth0", "ip link set eth0 up", "ip link set lo up",
		"ip route add default via 203.0.113.1")
	sh(t, ctx, n.Outside, "ip route add 203.0.113.0/24 via "+node.HostOutside4.Addr().String())
	return x
}

// probe connects over TCP from "from" to a listener in "to" at addr; an
// error means the connection was not made in time.
func probe(ctx context.Context, from, to ns.NetNS, addr netip.Addr) error {
	ap := netip.AddrPortFrom(addr, 18081)
	ln, err := node.ListenIn(to, ap)
	if err != nil {
		return err
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return from.Do(func(ns.NetNS) error {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", ap.String())
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// waitFor polls cond until it holds (an error after 20 s).
func waitFor(ctx context.Context, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// waitMetric waits until the agent's metric reaches at least want.
func waitMetric(ctx context.Context, n *node.Node, name string, want float64) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		v, err := n.Metric(ctx, name, nil)
		if err == nil && v >= want {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.Join(errors.New(name+" never reached its value"), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestHostForwardingOff: on a host that does not forward, the agent says so
// (its log names the sysctl, its metric reads 0), and with --ip-forward it
// turns forwarding on, so that pods reach the outside.
func TestHostForwardingOff(t *testing.T) {
	ctx := testContext(t)
	for _, turnOn := range []bool{false, true} {
		name := map[bool]string{false: "reported", true: "--ip-forward"}[turnOn]
		t.Run(name, func(t *testing.T) {
			var extra []string
			if turnOn {
				extra = []string{"--ip-forward"}
			}
			n := newNode(t, node.Options{DeferAgent: true, ExtraAgentArgs: extra})
			for _, k := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
				if err := node.Sysctl(n.Host, k, "0"); err != nil {
					t.Fatal(err)
				}
			}
			if err := n.StartAgent(ctx); err != nil {
				t.Fatal(err)
			}
			want := map[bool]float64{false: 0, true: 1}[turnOn]
			for _, fam := range []string{"ipv4", "ipv6"} {
				got, err := n.Metric(ctx, "shm_cni_host_forwarding", map[string]string{"family": fam})
				if err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Errorf("shm_cni_host_forwarding{family=%q} = %v, want %v", fam, got, want)
				}
			}
			log, err := os.ReadFile(n.Agent().LogPath)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"the host does not forward IPv4", "net.ipv4.conf.shm0.forwarding", "the host does not forward IPv6"} {
				if got := strings.Contains(string(log), s); got == turnOn {
					t.Errorf("agent log mentions %q: %v, want %v", s, got, !turnOn)
				}
			}
			if !turnOn {
				return
			}
			for _, k := range []string{"ipv4/ip_forward", "ipv6/conf/all/forwarding"} {
				out := sh(t, ctx, n.Host, "cat /proc/sys/net/"+k)
				if strings.TrimSpace(out) != "1" {
					t.Errorf("net/%s = %q after --ip-forward, want 1", k, out)
				}
			}
			k := addPod(t, ctx, n, "k", node.KindTap)
			for _, v6 := range []bool{false, true} {
				if _, err := n.Transfer(ctx, n.PodPeer(k), n.OutsidePeer(), v6, 1<<20); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// TestSameNodeService: a pod's connection to a Service whose endpoint is a
// pod of the same node works, as kube-proxy makes it: a DNAT in the host
// (here an nftables rule from a Service address to the endpoint). Kernel
// pods and sandboxes as clients and as endpoints, IPv4 and IPv6; the
// endpoint sees the client pod's own address (NetworkPolicy judges it by
// that), and its replies go back through the host that undoes the DNAT:
// the router's hairpin table sends them there, as its metrics count.
func TestSameNodeService(t *testing.T) {
	ctx := testContext(t)
	n := newNode(t, node.Options{})
	k1, k2 := addPod(t, ctx, n, "k1", node.KindTap), addPod(t, ctx, n, "k2", node.KindTap)
	s1, s2 := addPod(t, ctx, n, "s1", node.KindShm), addPod(t, ctx, n, "s2", node.KindShm)
	vip := map[*node.Pod][2]netip.Addr{
		k2: {netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::10")},
		s2: {netip.MustParseAddr("10.96.0.20"), netip.MustParseAddr("fd00:96::20")},
	}
	rules := []string{"nft add table inet svc", "nft 'add chain inet svc pre { type nat hook prerouting priority -100; }'"}
	for p, a := range vip {
		rules = append(rules,
			"nft add rule inet svc pre ip daddr "+a[0].String()+" dnat ip to "+p.Addr4.String(),
			"nft add rule inet svc pre ip6 daddr "+a[1].String()+" dnat ip6 to "+p.Addr6.String())
	}
	sh(t, ctx, n.Host, rules...)
	for _, c := range []*node.Pod{k1, s1} {
		for _, e := range []*node.Pod{k2, s2} {
			for i, v6 := range []bool{false, true} {
				tr, err := n.TransferVia(ctx, n.PodPeer(c), n.PodPeer(e), v6, 1<<20, vip[e][i])
				if err != nil {
					t.Errorf("%s -> Service %s (endpoint %s): %v", c.Name, vip[e][i], e.Name, err)
					continue
				}
				want := c.Addr4
				if v6 {
					want = c.Addr6
				}
				if tr.From != want {
					t.Errorf("%s -> Service %s: the endpoint saw %s, want the client %s", c.Name, vip[e][i], tr.From, want)
				}
			}
		}
	}
	// Eight connections (two clients, two endpoints, two families),
	// each remembered once, their replies sent back to the host.
	for metric, min := range map[string]float64{"shm_cni_hairpin_connections_total": 8, "shm_cni_hairpin_packets_total": 8} {
		got, err := n.Metric(ctx, metric, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got < min {
			t.Errorf("%s = %v, want at least %v", metric, got, min)
		}
	}
	if got, err := n.Metric(ctx, "shm_cni_hairpin_dropped_packets_total", nil); err != nil || got != 0 {
		t.Errorf("shm_cni_hairpin_dropped_packets_total = %v (%v), want 0", got, err)
	}
}
