package policy

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
)

// policyDenied returns the per-policy counts by "namespace/name".
func policyDenied(e *Enforcer) map[string][2]uint64 {
	out := map[string][2]uint64{}
	for _, c := range e.PolicyCounts() {
		out[c.Namespace+"/"+c.Policy] = c.Denied
	}
	return out
}

// webTwice isolates prod/web for ingress by two policies (TCP 80 from
// prod/client, TCP 9090 from anywhere) and prod/db by a third (nothing
// in); prod/client is isolated by none.
var webTwice = []*networkingv1.NetworkPolicy{
	netpol("prod", "web-http", sel("app", "web"), ingressOnly, from(ports(tcpPort(80)), podPeer(sel("app", "client"), nil)), nil),
	netpol("prod", "web-metrics", sel("app", "web"), ingressOnly, from(ports(tcpPort(9090))), nil),
	netpol("prod", "db-closed", sel("app", "db"), ingressOnly, nil, nil),
}

// TestPolicyCountsPerPolicy checks that a denied packet counts against
// every policy isolating its pod in its direction and no other, and that
// a packet to a pod no policy isolates counts against none.
func TestPolicyCountsPerPolicy(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, webTwice...)
	web, db, client, tool := endpoints["web"].v4, endpoints["db"].v4, endpoints["client"].v4, endpoints["tool"].v4
	for _, p := range []packet{
		{src: tool, dst: web, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpSyn},    // not client: denied
		{src: client, dst: web, proto: ProtoTCP, sport: 40001, dport: 443, flags: tcpSyn}, // no rule for 443: denied
		{src: client, dst: db, proto: ProtoUDP, sport: 40002, dport: 53},                  // db takes nothing
	} {
		if e.FromPod(p.bytes()) {
			t.Fatalf("%+v passed, want denied", p)
		}
	}
	for _, p := range []packet{
		{src: client, dst: web, proto: ProtoTCP, sport: 40003, dport: 80, flags: tcpSyn},
		{src: web, dst: client, proto: ProtoTCP, sport: 40004, dport: 22, flags: tcpSyn}, // client: not isolated
	} {
		if !e.FromPod(p.bytes()) {
			t.Fatalf("%+v denied, want passed", p)
		}
	}
	got := policyDenied(e)
	want := map[string][2]uint64{
		"prod/web-http":    {Ingress: 2},
		"prod/web-metrics": {Ingress: 2},
		"prod/db-closed":   {Ingress: 1},
	}
	if len(got) != len(want) {
		t.Errorf("policies counted: %v, want %v", got, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s denied %v, want %v", k, got[k], w)
		}
	}
	for _, c := range e.PolicyCounts() {
		if !c.Isolates[Ingress] || c.Isolates[Egress] {
			t.Errorf("%s/%s isolates %v, want ingress only", c.Namespace, c.Policy, c.Isolates)
		}
	}
}

// TestPolicyCountsSurviveSwap checks that a policy's count carries on
// through new snapshots while the policy exists, also when the set of
// policies selecting its pods changes, and that a deleted policy's count
// goes with it.
func TestPolicyCountsSurviveSwap(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, webTwice...)
	web, tool := endpoints["web"].v4, endpoints["tool"].v4
	denyOne := func(sport uint16) {
		t.Helper()
		if e.FromPod(packet{src: tool, dst: web, proto: ProtoTCP, sport: sport, dport: 81, flags: tcpSyn}.bytes()) {
			t.Fatalf("tool -> web:81 passed, want denied")
		}
	}
	denyOne(1)
	// The same policies again: the same counters.
	e.Set(Compile(clusterInput(webTwice...), e.Snapshot()))
	denyOne(2)
	// web-metrics goes, web-ssh comes: web's set of policies changes.
	ssh := netpol("prod", "web-ssh", sel("app", "web"), ingressOnly, from(ports(tcpPort(22))), nil)
	changed := []*networkingv1.NetworkPolicy{webTwice[0], ssh, webTwice[2]}
	e.Set(Compile(clusterInput(changed...), e.Snapshot()))
	denyOne(3)
	// Two more compiles fold the groups no snapshot uses any more.
	for range 2 {
		e.Set(Compile(clusterInput(changed...), e.Snapshot()))
	}
	denyOne(4)
	got := policyDenied(e)
	if w := [2]uint64{Ingress: 4}; got["prod/web-http"] != w {
		t.Errorf("web-http denied %v, want %v", got["prod/web-http"], w)
	}
	if w := [2]uint64{Ingress: 2}; got["prod/web-ssh"] != w {
		t.Errorf("web-ssh denied %v, want %v", got["prod/web-ssh"], w)
	}
	if c, ok := got["prod/web-metrics"]; ok {
		t.Errorf("deleted web-metrics still counted: %v", c)
	}
	// Back again, web-metrics starts afresh.
	e.Set(Compile(clusterInput(webTwice...), e.Snapshot()))
	denyOne(5)
	got = policyDenied(e)
	if w := [2]uint64{Ingress: 1}; got["prod/web-metrics"] != w {
		t.Errorf("recreated web-metrics denied %v, want %v", got["prod/web-metrics"], w)
	}
	if w := [2]uint64{Ingress: 5}; got["prod/web-http"] != w {
		t.Errorf("web-http denied %v, want %v", got["prod/web-http"], w)
	}
}

// debugLog returns a logger at debug level writing to buf, and a reader
// of its lines.
func debugLog() (*slog.Logger, func() []string) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	return log, func() []string {
		s := strings.TrimSpace(buf.String())
		buf.Reset()
		if s == "" {
			return nil
		}
		return strings.Split(s, "\n")
	}
}

// TestDenyLogReasons checks the debug line of each cause of a denial:
// the flow, the pod, the direction, the policies and the reason.
func TestDenyLogReasons(t *testing.T) {
	client, db, web, tool := endpoints["client"].v4, endpoints["db"].v4, endpoints["web"].v4, endpoints["tool"].v4
	out := func(port int32) *networkingv1.NetworkPolicy {
		return netpol("prod", "client-out", sel("app", "client"), egressOnly, nil,
			to(ports(tcpPort(port)), podPeer(sel("app", "db"), nil)))
	}
	syn := packet{src: client, dst: db, proto: ProtoTCP, sport: 40000, dport: 9999, flags: tcpSyn}
	for _, tc := range []struct {
		name  string
		pols  []*networkingv1.NetworkPolicy
		cfg   func(*TrackerConfig)
		setup func(t *testing.T, e *Enforcer) // packets before the logged one
		pkt   []byte
		want  []string
	}{
		{name: "no rule, peer", pols: webTwice,
			pkt:  packet{src: tool, dst: web, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpSyn}.bytes(),
			want: []string{`flow="TCP 10.0.1.11:40000 -> 10.0.0.10:80"`, "pod=prod/web", "direction=ingress", "policies=\"[prod/web-http prod/web-metrics]\"", `reason="no rule allows it"`, "10.0.1.11 is a peer for TCP 9090 only, not TCP port 80", "suppressed=0"}},
		{name: "no rule, no peer", pols: []*networkingv1.NetworkPolicy{out(5432)},
			pkt:  packet{src: client, dst: tool, proto: ProtoUDP, sport: 40000, dport: 53}.bytes(),
			want: []string{"pod=prod/client", "direction=egress", "policies=[prod/client-out]", `reason="no rule allows it"`, `detail="no rule has 10.0.1.11 as a peer"`}},
		{name: "no rule, no ports", pols: []*networkingv1.NetworkPolicy{out(5432)},
			pkt:  packet{src: client, dst: db, proto: ProtoICMP, typ: 8, id: 3}.bytes(),
			want: []string{`flow="ICMP 10.0.0.12 -> 10.0.0.11"`, `reason="no rule allows it"`, "a packet without ports"}},
		{name: "connection denied earlier", pols: []*networkingv1.NetworkPolicy{out(9999)},
			setup: func(t *testing.T, e *Enforcer) {
				if !e.FromPod(syn.bytes()) {
					t.Fatal("SYN denied")
				}
				e.Set(Compile(clusterInput(out(5432)), e.Snapshot()))
			},
			pkt:  syn.reply().bytes(),
			want: []string{"pod=prod/client", "direction=egress", `reason="connection denied earlier"`}},
		{name: "untracked ICMP error", pols: webTwice,
			pkt: packet{src: tool, dst: web, proto: ProtoICMP, typ: 3,
				quote: packet{src: web, dst: tool, proto: ProtoUDP, sport: 53, dport: 40000}.bytes()}.bytes(),
			want: []string{"pod=prod/web", "direction=ingress", `reason="untracked ICMP error"`, "it quotes UDP 10.0.0.10:53 -> 10.0.1.11:40000"}},
		{name: "headers do not parse", pols: webTwice,
			pkt:  packet{src: tool, dst: web, proto: ProtoTCP, sport: 1, dport: 80}.bytes()[:22],
			want: []string{"pod=prod/web", "direction=ingress", `reason="headers do not parse"`}},
		{name: "tracker full", pols: []*networkingv1.NetworkPolicy{out(9999)},
			cfg: func(c *TrackerConfig) { c.MaxConns, c.PodShare = 1, 1 },
			setup: func(t *testing.T, e *Enforcer) {
				if !e.FromPod(syn.bytes()) || !e.FromPod(syn.reply().bytes()) {
					t.Fatal("first connection denied")
				}
			},
			pkt:  packet{src: client, dst: db, proto: ProtoTCP, sport: 40001, dport: 9999, flags: tcpSyn}.bytes(),
			want: []string{"pod=prod/client", "direction=egress", `reason="tracker full"`, "the pod tracks 1 connections"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultTrackerConfig
			if tc.cfg != nil {
				tc.cfg(&cfg)
			}
			e, _ := enforcer(t, cfg, tc.pols...)
			log, lines := debugLog()
			e.LogDenials(log)
			if tc.setup != nil {
				tc.setup(t, e)
			}
			if l := lines(); len(l) != 0 {
				t.Fatalf("logged before the denial: %q", l)
			}
			if e.FromPod(tc.pkt) {
				t.Fatalf("packet passed, want denied")
			}
			l := lines()
			if len(l) != 1 {
				t.Fatalf("logged %d lines, want 1: %q", len(l), l)
			}
			if !strings.Contains(l[0], `msg="network policy denied a packet"`) || !strings.Contains(l[0], "level=DEBUG") {
				t.Errorf("line %q: not the debug message", l[0])
			}
			for _, w := range tc.want {
				if !strings.Contains(l[0], w) {
					t.Errorf("line %q lacks %q", l[0], w)
				}
			}
		})
	}
}

// TestDenyLogOff checks that a logger above debug level turns the lines
// off.
func TestDenyLogOff(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, webTwice...)
	var buf bytes.Buffer
	e.LogDenials(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if e.log.Load() != nil {
		t.Fatal("denial log on at info level")
	}
	e.FromPod(packet{src: endpoints["tool"].v4, dst: endpoints["web"].v4, proto: ProtoTCP, sport: 1, dport: 81, flags: tcpSyn}.bytes())
	if buf.Len() != 0 {
		t.Errorf("logged at info level: %q", buf.String())
	}
}

// TestDenyLogRateLimit checks that a burst of denials logs DenyLogBurst
// lines, and the next line, once the bucket refilled, says how many were
// suppressed.
func TestDenyLogRateLimit(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, webTwice...)
	log, lines := debugLog()
	e.LogDenials(log)
	now := time.Unix(1000, 0)
	e.log.Load().now = func() time.Time { return now }
	deny := func(n int) {
		for i := range n {
			e.FromPod(packet{src: endpoints["tool"].v4, dst: endpoints["web"].v4, proto: ProtoTCP, sport: uint16(i), dport: 81, flags: tcpSyn}.bytes())
		}
	}
	deny(1000)
	if got := len(lines()); got != DenyLogBurst {
		t.Fatalf("1000 denials at once logged %d lines, want %d", got, DenyLogBurst)
	}
	now = now.Add(time.Second / DenyLogRate) // one token
	deny(2)
	l := lines()
	if len(l) != 1 {
		t.Fatalf("after 1/%d s: %d lines, want 1", DenyLogRate, len(l))
	}
	if want := "suppressed=980"; !strings.Contains(l[0], want) {
		t.Errorf("line %q lacks %q", l[0], want)
	}
	now = now.Add(time.Hour) // full again, never more than the burst
	deny(DenyLogBurst + 5)
	l = lines()
	if len(l) != DenyLogBurst {
		t.Fatalf("after an hour: %d lines, want %d", len(l), DenyLogBurst)
	}
	if want := "suppressed=1 "; !strings.Contains(l[0]+" ", want) {
		t.Errorf("first line after the pause %q lacks %q", l[0], want)
	}
}

// TestPolicyCountsConcurrent denies packets on two goroutines while a
// third swaps snapshots (the set of policies selecting the pod changing
// back and forth) and checks that a policy's count, read meanwhile, never
// goes down (run with -race: the packet path and the compiles share the
// counters).
func TestPolicyCountsConcurrent(t *testing.T) {
	e, _ := enforcer(t, DefaultTrackerConfig, webTwice...)
	ssh := netpol("prod", "web-ssh", sel("app", "web"), ingressOnly, from(ports(tcpPort(22))), nil)
	sets := [][]*networkingv1.NetworkPolicy{webTwice, {webTwice[0], ssh, webTwice[2]}}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 2 {
		wg.Go(func() {
			p := packet{src: endpoints["tool"].v4, dst: endpoints["web"].v4, proto: ProtoTCP, dport: 81, flags: tcpSyn}
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				p.sport = uint16(g<<15 | i&0x7fff)
				e.FromPod(p.bytes())
			}
		})
	}
	wg.Go(func() {
		defer close(done)
		for i := range 200 {
			e.Set(Compile(clusterInput(sets[i%2]...), e.Snapshot()))
		}
	})
	var last uint64
	for reading := true; reading; {
		select {
		case <-done:
			reading = false
		default:
		}
		got := policyDenied(e)["prod/web-http"][Ingress]
		if got < last {
			t.Fatalf("web-http's count went down: %d after %d", got, last)
		}
		last = got
	}
	wg.Wait()
	last = policyDenied(e)["prod/web-http"][Ingress]
	e.FromPod(packet{src: endpoints["tool"].v4, dst: endpoints["web"].v4, proto: ProtoTCP, sport: 1, dport: 82, flags: tcpSyn}.bytes())
	if got := policyDenied(e)["prod/web-http"][Ingress]; got != last+1 {
		t.Errorf("web-http's count %d after one more denial, want %d", got, last+1)
	}
}
