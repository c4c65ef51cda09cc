package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// hostileTransfer is what well-behaved pods send while a hostile sandbox
// misbehaves: enough to overlap every mode's misbehaviour.
const hostileTransfer = 32 << 20

// hostileDuration is how long the flooding and stalling modes run.
const hostileDuration = 4 * time.Second

// hostileEnv is a node with well-behaved pods (two kernel pods, a sandbox)
// and a hostile sandbox pod h.
type hostileEnv struct {
	n          *node.Node
	k1, k2, s1 *node.Pod
	h          *node.Pod
	// cpuCap, if not nil, holds the hostile sandboxes keepHostile starts.
	cpuCap *cpuCap
}

func newHostileEnv(t *testing.T, ctx context.Context) *hostileEnv {
	return newHostileEnvWith(t, ctx, node.Options{})
}

func newHostileEnvWith(t *testing.T, ctx context.Context, opts node.Options) *hostileEnv {
	n := newNode(t, opts)
	return &hostileEnv{
		n:  n,
		k1: addPod(t, ctx, n, "k1", node.KindTap),
		k2: addPod(t, ctx, n, "k2", node.KindTap),
		s1: addPod(t, ctx, n, "s1", node.KindShm),
		h:  addPod(t, ctx, n, "h", node.KindShm),
	}
}

// startHostile runs the hostile program on h and waits until it holds the
// link (or, for reconnect, has finished its attachments).
func (e *hostileEnv) startHostile(t *testing.T, ctx context.Context, args ...string) *node.Sandbox {
	t.Helper()
	sb, err := e.n.StartHostile(e.h, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Stop() })
	if _, err := sb.WaitLine(ctx, "attached"); err != nil {
		t.Fatal(err)
	}
	return sb
}

// wellBehavedTraffic runs verified TCP transfers between the well-behaved
// pods and returns their errors joined: kernel to kernel and kernel to
// sandbox at the same time, then sandbox to kernel (a sandbox link takes one
// sandbox process at a time, so s1 cannot be both ends at once).
func (e *hostileEnv) wellBehavedTraffic(ctx context.Context) error {
	var errs []error
	for _, round := range [][][2]*node.Pod{{{e.k1, e.k2}, {e.k2, e.s1}}, {{e.s1, e.k1}}} {
		roundErrs := make([]error, len(round))
		var wg sync.WaitGroup
		for i, p := range round {
			wg.Go(func() {
				_, roundErrs[i] = e.n.Transfer(ctx, e.n.PodPeer(p[0]), e.n.PodPeer(p[1]), false, hostileTransfer)
			})
		}
		wg.Wait()
		errs = append(errs, roundErrs...)
	}
	return errors.Join(errs...)
}

// metric reads a counter of h's link.
func (e *hostileEnv) metric(t *testing.T, ctx context.Context, name string, labels ...string) float64 {
	t.Helper()
	match := map[string]string{"container_id": e.h.RT.ContainerID}
	for i := 0; i+1 < len(labels); i += 2 {
		match[labels[i]] = labels[i+1]
	}
	v, err := e.n.Metric(ctx, name, match)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// healthyAgain checks that h's link serves a well-behaved sandbox once the
// hostile one is gone, and that the agent holds no more than it did before.
func (e *hostileEnv) healthyAgain(t *testing.T, ctx context.Context, base agentFootprint) {
	t.Helper()
	if _, err := e.n.Transfer(ctx, e.n.PodPeer(e.k1), e.n.PodPeer(e.h), false, 4<<20); err != nil {
		t.Errorf("h's link after the hostile sandbox left: %v", err)
	}
	// Back to the state of base: no sandbox holds a link.
	e.h.StopServer()
	e.s1.StopServer()
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	f, err := settledFootprint(sctx, e.n, base)
	if err != nil {
		t.Fatal(err)
	}
	checkFootprint(t, "after the hostile sandbox", f, base)
}

// TestHostileGarbage: a sandbox that scribbles over its shared pages and
// rings is cut off (a protocol violation, counted) while the other pods'
// traffic flows; its link then serves the next, well-behaved sandbox.
func TestHostileGarbage(t *testing.T) {
	ctx := testContext(t)
	e := newHostileEnv(t, ctx)
	base, err := footprint(ctx, e.n)
	if err != nil {
		t.Fatal(err)
	}
	for seed := 1; seed <= 3; seed++ {
		sb := e.startHostile(t, ctx, "--mode", "garbage", "--seed", fmt.Sprint(seed), "--duration", "20s")
		if err := e.wellBehavedTraffic(ctx); err != nil {
			t.Errorf("seed %d: well-behaved traffic: %v", seed, err)
		}
		if _, err := sb.WaitLine(ctx, "cut off"); err != nil {
			t.Fatalf("seed %d: the agent did not cut the scribbling sandbox off: %v", seed, err)
		}
		if err := sb.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		if got := e.metric(t, ctx, "shm_cni_link_protocol_violations_total"); got < float64(seed) {
			t.Errorf("seed %d: protocol violations counted %v, want >= %d", seed, got, seed)
		}
	}
	if got := e.metric(t, ctx, "shm_cni_link_up"); got != 0 {
		t.Errorf("h's link up = %v after the cut-off, want 0", got)
	}
	e.healthyAgain(t, ctx, base)
}

// TestHostileFlood: a sandbox sending as fast as it can (to a pod address
// nobody has, so the router drops it) does not stop the other pods'
// traffic; its frames are counted; and the agent's per-link limit
// (--link-max-pps, low here) bounds what the router took from it: no more
// than the token bucket allows for the time that passed (an upper bound: a
// slow machine only takes fewer), with the link paused for it.
func TestHostileFlood(t *testing.T) {
	const pps = 5000
	ctx := testContext(t)
	e := newHostileEnvWith(t, ctx, node.Options{ExtraAgentArgs: []string{fmt.Sprintf("--link-max-pps=%d", pps)}})
	base, err := footprint(ctx, e.n)
	if err != nil {
		t.Fatal(err)
	}
	nobody := unassigned(t, e.n)
	start := time.Now()
	sb := e.startHostile(t, ctx, "--mode", "flood", "--to", netip.AddrPortFrom(nobody, 9).String(), "--duration", hostileDuration.String())
	if err := e.wellBehavedTraffic(ctx); err != nil {
		t.Errorf("well-behaved traffic: %v", err)
	}
	l, err := sb.WaitLine(ctx, "done flood")
	if err != nil {
		t.Fatal(err)
	}
	got := e.metric(t, ctx, "shm_cni_link_receive_packets_total")
	elapsed := time.Since(start)
	// A full bucket (20 ms of the rate, at least a batch of 64 frames) and
	// one batch charged after its delivery; 1% for rounding.
	bound := (pps*elapsed.Seconds() + max(pps*0.02, 64) + 64) * 1.01
	throttled := e.metric(t, ctx, "shm_cni_link_receive_throttled_total")
	t.Logf("the router took %.0f packets from the flooding sandbox in %v (bound %.0f; %s), paused its link %.0f times",
		got, elapsed.Round(time.Millisecond), bound, l, throttled)
	if got == 0 || got > bound {
		t.Errorf("the router took %.0f packets from the flooding sandbox in %v, want 1..%.0f", got, elapsed, bound)
	}
	// A race-built agent may take fewer frames than the limit allows
	// (about 2,000 a second here): then there is nothing to pause for.
	if throttled == 0 && !raceTest {
		t.Error("the agent never paused the flooding sandbox's link")
	}
	if got, err := e.n.Metric(ctx, "shm_cni_unrouted_drops_total", nil); err != nil || got == 0 {
		t.Errorf("unrouted drops %v (%v), want the flood counted", got, err)
	}
	if err := sb.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	e.healthyAgain(t, ctx, base)
}

// TestHostileStall: a sandbox that stops consuming fills its receive queue;
// the router drops and counts what it cannot deliver, never blocks, and the
// other pods' traffic flows.
func TestHostileStall(t *testing.T) {
	ctx := testContext(t)
	e := newHostileEnv(t, ctx)
	base, err := footprint(ctx, e.n)
	if err != nil {
		t.Fatal(err)
	}
	sb := e.startHostile(t, ctx, "--mode", "stall", "--duration", hostileDuration.String())
	// k1 sends UDP at h (the 4 MiB queue takes ~2800 frames of 1400 B).
	sent := make(chan error, 1)
	go func() { sent <- udpFlood(e.k1.NS, netip.AddrPortFrom(e.h.Addr4, 9), 20000) }()
	if err := e.wellBehavedTraffic(ctx); err != nil {
		t.Errorf("well-behaved traffic: %v", err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if got := e.metric(t, ctx, "shm_cni_link_endpoint_drops_total", "direction", "transmit"); got == 0 {
		t.Errorf("no transmit drop counted on the stalled sandbox's link")
	}
	if err := sb.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	e.healthyAgain(t, ctx, base)
}

// TestHostileReconnect: a sandbox attaching and hanging up over and over
// (some before the link config arrives) leaves the agent as it was.
func TestHostileReconnect(t *testing.T) {
	ctx := testContext(t)
	e := newHostileEnv(t, ctx)
	base, err := footprint(ctx, e.n)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.wellBehavedTraffic(ctx) }()
	sb := e.startHostile(t, ctx, "--mode", "reconnect", "--count", "150")
	l, err := sb.WaitLine(ctx, "done reconnect")
	if err != nil {
		t.Fatal(err)
	}
	if err := sb.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("well-behaved traffic: %v", err)
	}
	if l != "done reconnect 100" {
		t.Errorf("hostile reported %q, want 100 completed attachments", l)
	}
	e.healthyAgain(t, ctx, base)
}

// TestHostileSpoof: frames with another pod's addresses or MAC, ARP and NDP
// claims for another pod's address and packets for the host's loopback are
// dropped and counted by reason; the receiver sees only the honest
// datagram, from the sender's own address.
func TestHostileSpoof(t *testing.T) {
	ctx := testContext(t)
	e := newHostileEnv(t, ctx)
	for _, v6 := range []bool{false, true} {
		before := map[string]float64{}
		for _, r := range []string{"source_address", "source_mac", "destination", "arp", "ndp"} {
			before[r] = e.metric(t, ctx, "shm_cni_link_spoofed_drops_total", "reason", r)
		}
		conn, err := listenUDPIn(e.k2.NS, netip.AddrPortFrom(e.k2.Addr(v6), 0))
		if err != nil {
			t.Fatal(err)
		}
		to := netip.AddrPortFrom(e.k2.Addr(v6), uint16(conn.LocalAddr().(*net.UDPAddr).Port))
		sb := e.startHostile(t, ctx, "--mode", "spoof", "--to", to.String(), "--as", e.k1.Addr(v6).String())
		if err := sb.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		got := readDatagrams(conn, time.Second)
		conn.Close()
		want := []string{"honest from " + e.h.Addr(v6).String()}
		if strings.Join(got, "; ") != strings.Join(want, "; ") {
			t.Errorf("%s: k2 received %q, want %q", family(v6), got, want)
		}
		// Ten rounds of: another pod's address and an outside address
		// (source_address), another MAC, the loopback, an ARP or NDP
		// claim.
		wantDrops := map[string]float64{"source_address": 20, "source_mac": 10, "destination": 10}
		if v6 {
			wantDrops["ndp"] = 10
		} else {
			wantDrops["arp"] = 10
		}
		for r, n := range wantDrops {
			if got := e.metric(t, ctx, "shm_cni_link_spoofed_drops_total", "reason", r) - before[r]; got != n {
				t.Errorf("%s: %s drops %v, want %v", family(v6), r, got, n)
			}
		}
	}
	// The well-behaved pods are unaffected.
	if err := e.wellBehavedTraffic(ctx); err != nil {
		t.Errorf("well-behaved traffic: %v", err)
	}
}

func family(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// unassigned returns an address in the node's IPv4 pod CIDR that no pod has
// (the last usable one; the tests add far fewer pods).
func unassigned(t *testing.T, n *node.Node) netip.Addr {
	for _, p := range n.PodCIDRs() {
		if p.Addr().Is4() {
			a := p.Masked().Addr().As4()
			a[3] += byte(1<<(32-p.Bits())) - 2
			return netip.AddrFrom4(a)
		}
	}
	t.Fatal("no IPv4 pod CIDR")
	return netip.Addr{}
}

// listenUDPIn opens a UDP socket bound to ap inside netns x.
func listenUDPIn(x ns.NetNS, ap netip.AddrPort) (*net.UDPConn, error) {
	var conn *net.UDPConn
	err := x.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		return err
	})
	return conn, err
}

// readDatagrams returns "<payload> from <source>" for every datagram conn
// receives until none came for quiet.
func readDatagrams(conn *net.UDPConn, quiet time.Duration) []string {
	var out []string
	buf := make([]byte, 2048)
	for {
		conn.SetReadDeadline(time.Now().Add(quiet))
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return out
		}
		out = append(out, fmt.Sprintf("%s from %s", buf[:n], from.Addr().Unmap()))
	}
}

// udpFlood sends count 1400-byte datagrams from netns x to to.
func udpFlood(x ns.NetNS, to netip.AddrPort, count int) error {
	var conn *net.UDPConn
	if err := x.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
		return err
	}); err != nil {
		return err
	}
	defer conn.Close()
	b := make([]byte, 1400)
	for i := 0; i < count; i++ {
		// ICMP errors come back as ECONNREFUSED on a later write: keep
		// sending through them; anything else is an error.
		if _, err := conn.Write(b); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("datagram %d to %s: %w", i, to, err)
		}
	}
	return nil
}

// TestPodCannotReachAgent: the agent's HTTP endpoints listen on the host's
// loopback only; a pod reaches neither them through the node gateway
// address nor anything on the router's own gateway address (the router
// terminates no TCP). A crafted packet for the host's loopback is dropped
// by the filter (TestHostileSpoof).
func TestPodCannotReachAgent(t *testing.T) {
	ctx := testContext(t)
	n := newNode(t, node.Options{})
	k1 := addPod(t, ctx, n, "k1", node.KindTap)
	port := uint16(9309)
	if _, p, err := net.SplitHostPort(node.MetricsAddr); err == nil {
		fmt.Sscan(p, &port)
	}
	// The host itself reaches the metrics.
	if _, err := n.Metric(ctx, "go_goroutines", nil); err != nil {
		t.Fatalf("the host cannot read the metrics: %v", err)
	}
	for _, to := range []netip.AddrPort{
		netip.AddrPortFrom(n.Gateway(false), port),
		netip.AddrPortFrom(n.Gateway(true), port),
		netip.AddrPortFrom(netip.MustParseAddr("169.254.1.1"), port),
	} {
		err := k1.NS.Do(func(ns.NetNS) error {
			c, err := net.DialTimeout("tcp", to.String(), 2*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			t.Errorf("pod k1 connected to %s", to)
		}
	}
}

// TestHostileMemoryBounded: what pods can make the agent allocate is
// bounded per link. Ten flooding sandboxes at once grow the agent's live
// heap (as marked by a collection made while they flood; the in-use heap
// would also count the garbage the flood made since) by less than 1 MiB
// each; the queue memory itself is the memfds the conflist sized (checked
// on attach), not heap.
func TestHostileMemoryBounded(t *testing.T) {
	const hostiles = 10
	ctx := testContext(t)
	n := newNode(t, node.Options{})
	var pods []*node.Pod
	for i := range hostiles {
		pods = append(pods, addPod(t, ctx, n, fmt.Sprintf("h%d", i), node.KindShm))
	}
	saveHeapProfile(t, ctx, n, "hostile-before")
	base, err := n.Metric(ctx, "go_gc_heap_live_bytes", nil)
	if err != nil {
		t.Fatal(err)
	}
	baseRSS, _ := n.Metric(ctx, "process_resident_memory_bytes", nil)
	nobody := netip.AddrPortFrom(unassigned(t, n), 9)
	var sbs []*node.Sandbox
	for _, p := range pods {
		sb, err := n.StartHostile(p, "--mode", "flood", "--to", nobody.String(), "--duration", "20s")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sb.Stop() })
		if _, err := sb.WaitLine(ctx, "attached"); err != nil {
			t.Fatal(err)
		}
		sbs = append(sbs, sb)
	}
	time.Sleep(2 * time.Second) // flooding
	saveHeapProfile(t, ctx, n, "hostile-during")
	heap, err := n.Metric(ctx, "go_gc_heap_live_bytes", nil)
	if err != nil {
		t.Fatal(err)
	}
	rss, _ := n.Metric(ctx, "process_resident_memory_bytes", nil)
	for _, sb := range sbs {
		sb.Stop()
	}
	t.Logf("agent live heap %.1f MiB with %d attached idle links, %.1f MiB while they flood; RSS %.1f MiB, %.1f MiB (the RSS counts the touched queue pages)",
		base/(1<<20), hostiles, heap/(1<<20), baseRSS/(1<<20), rss/(1<<20))
	if grown := heap - base; grown > hostiles*(1<<20) {
		t.Errorf("the agent's live heap grew by %.1f MiB for %d flooding sandboxes, want < 1 MiB each", grown/(1<<20), hostiles)
	}
}
