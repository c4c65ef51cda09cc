package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// codeNoSuchAttachment is the agent's CHECK failure: no attachment, or not
// as the runtime config says.
const codeNoSuchAttachment = 102

// bandwidthLimit is the limit of the limited pods: 50 Mbit/s each way with a
// burst of 1 Mbit (128 KiB), far below what a TCP sender between two pods
// of one node sends (several Gbit/s), so a bulk transfer meets it whatever
// the machine's speed; 8 MiB take about 1.3 s at the rate.
var bandwidthLimit = linkspec.Bandwidth{IngressRate: 50_000_000, IngressBurst: 1_000_000, EgressRate: 50_000_000, EgressBurst: 1_000_000}

// limited is what the limit of pod p did in direction dir ("ingress",
// "egress"), from the agent's metrics: packets held and dropped.
type limited struct{ delayed, dropped float64 }

func (l limited) String() string { return fmt.Sprintf("%v held, %v dropped", l.delayed, l.dropped) }

func bandwidthCounts(t *testing.T, ctx context.Context, n *node.Node, p *node.Pod, dir string) limited {
	t.Helper()
	mf, err := n.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	match := map[string]string{"container_id": p.RT.ContainerID, "direction": dir}
	var l limited
	for _, m := range []struct {
		name string
		v    *float64
	}{{"shm_cni_link_bandwidth_delayed_total", &l.delayed}, {"shm_cni_link_bandwidth_drops_total", &l.dropped}} {
		if *m.v, err = node.SumMetric(mf, m.name, match); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// wantBandwidths fails t unless /attachments shows each pod's limit (nil:
// none).
func wantBandwidths(t *testing.T, ctx context.Context, n *node.Node, want map[*node.Pod]*linkspec.Bandwidth) {
	t.Helper()
	atts, err := n.Attachments(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := make(map[string]*linkspec.Bandwidth)
	for _, a := range atts {
		got[a.ContainerID] = a.Bandwidth
	}
	for p, w := range want {
		g, ok := got[p.RT.ContainerID]
		switch {
		case !ok:
			t.Errorf("/attachments lacks pod %s", p.Name)
		case (g == nil) != (w == nil) || (g != nil && *g != *w):
			t.Errorf("/attachments: pod %s's bandwidth %v, want %v", p.Name, g, w)
		}
	}
}

// TestBandwidth: pods given the bandwidth capability (runtimeConfig
// bandwidth, as a runtime passes the kubernetes.io/*-bandwidth annotations)
// get it enforced on their link, kernel pods' (on tap and veth links) and
// sandboxes' alike, both ways. Each bulk transfer to and from a limited pod arrives intact
// (verified byte for byte) while the pod's counters for that direction
// (packets held, dropped) rise; the unlimited pods' counters stay 0.
// /attachments shows the limits; after an agent restart they still hold
// (the counters of the new agent rise again). Nothing here asserts a rate
// (the achieved one is logged): the limit is far below what the senders
// offer, so it must act.
func TestBandwidth(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	caps := map[string]any{"bandwidth": bandwidthLimit}
	addLimited := func(name, kind string) *node.Pod {
		p, err := n.AddPodWith(ctx, name, kind, caps)
		if err != nil {
			t.Fatalf("add pod: %v", err)
		}
		return p
	}
	kl, sl, vl := addLimited("kl", node.KindTap), addLimited("sl", node.KindShm), addLimited("vl", node.KindVeth)
	k2, s2, v2 := addPod(t, ctx, n, "k2", node.KindTap), addPod(t, ctx, n, "s2", node.KindShm), addPod(t, ctx, n, "v2", node.KindVeth)
	wantBandwidths(t, ctx, n, map[*node.Pod]*linkspec.Bandwidth{kl: &bandwidthLimit, sl: &bandwidthLimit, vl: &bandwidthLimit, k2: nil, s2: nil, v2: nil})
	// CHECK passes with the runtime config of ADD, and fails (102, no
	// such attachment) with another limit or none.
	l := networkList(t, n)
	for _, p := range []*node.Pod{kl, sl, vl, k2, s2, v2} {
		if err := n.CNICheck(ctx, n.CNI(""), l, p.RT); err != nil {
			t.Errorf("CHECK %s: %v", p.Name, err)
		}
	}
	other := *kl.RT
	other.CapabilityArgs = map[string]any{"bandwidth": linkspec.Bandwidth{IngressRate: 10_000_000, IngressBurst: 1_000_000}}
	err := n.CNICheck(ctx, n.CNI(""), l, &other)
	wantCode(t, "CHECK with another limit", err, codeNoSuchAttachment)
	t.Logf("CHECK with another limit: %v", err)
	other.CapabilityArgs = nil
	wantCode(t, "CHECK without the limit", n.CNICheck(ctx, n.CNI(""), l, &other), codeNoSuchAttachment)

	const size = 8 << 20
	type flow struct {
		src, dst *node.Pod
		limited  *node.Pod // whose limit the flow meets
		dir      string
	}
	flows := []flow{
		{k2, kl, kl, "ingress"},
		{kl, k2, kl, "egress"},
		{s2, sl, sl, "ingress"},
		{sl, s2, sl, "egress"},
		// A veth pod's limits are the host's tbf qdiscs.
		{v2, vl, vl, "ingress"},
		{vl, v2, vl, "egress"},
		// Both limits at once: kl's egress shapes the flow to the rate
		// first, so sl's ingress may have nothing left to do.
		{kl, sl, kl, "egress"},
	}
	run := func(when string, flows []flow) {
		for _, f := range flows {
			before := bandwidthCounts(t, ctx, n, f.limited, f.dir)
			tr, err := n.Transfer(ctx, n.PodPeer(f.src), n.PodPeer(f.dst), false, size)
			if err != nil {
				t.Errorf("%s: %v", when, err)
				continue
			}
			after := bandwidthCounts(t, ctx, n, f.limited, f.dir)
			t.Logf("%s: %s -> %s: %s intact in %v (%.1f Mbit/s against a limit of %d), %s's %s: %v -> %v",
				when, f.src.Name, f.dst.Name, mib(size), tr.Duration.Round(1e6), float64(tr.Bytes)*8/tr.Duration.Seconds()/1e6,
				bandwidthLimit.IngressRate/1e6, f.limited.Name, f.dir, before, after)
			if after.delayed+after.dropped <= before.delayed+before.dropped {
				t.Errorf("%s: %s -> %s: %s's %s limit held and dropped nothing (%v) in a transfer beyond it",
					when, f.src.Name, f.dst.Name, f.limited.Name, f.dir, after)
			}
		}
		for _, p := range []*node.Pod{k2, s2, v2} {
			for _, dir := range []string{"ingress", "egress"} {
				if v := bandwidthCounts(t, ctx, n, p, dir); v != (limited{}) {
					t.Errorf("%s: unlimited pod %s's %s limit counts %v", when, p.Name, dir, v)
				}
			}
		}
	}
	run("before the restart", flows)

	if err := n.StopAgent(); err != nil {
		t.Fatalf("stop agent: %v", err)
	}
	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	wantBandwidths(t, ctx, n, map[*node.Pod]*linkspec.Bandwidth{kl: &bandwidthLimit, sl: &bandwidthLimit, vl: &bandwidthLimit, k2: nil, s2: nil, v2: nil})
	// sl's sandbox lost its link with the agent; a new one dials it.
	sl.StopServer()
	s2.StopServer()
	run("after the restart", flows[:6])
}

// TestBandwidthRefused: an ADD whose bandwidth capability the reference
// plugin (or Kubernetes' bounds) would refuse fails with code 7 naming the
// field, for either kind, and leaves nothing behind: no interface in the
// pod netns, no attachment, record or address in the agent.
func TestBandwidthRefused(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	for _, tc := range []struct {
		name string
		bw   any
		want string
	}{
		{"negative rate", map[string]any{"ingressRate": -1, "ingressBurst": 1000}, "runtimeConfig.bandwidth.ingressRate: got a JSON number -1"},
		{"rate without burst", map[string]any{"egressRate": 1_000_000}, "runtimeConfig.bandwidth.egressBurst: required when egressRate is set"},
		{"burst without rate", map[string]any{"ingressBurst": 1_000_000}, "runtimeConfig.bandwidth.ingressRate: required when ingressBurst is set"},
		{"burst over 4 GB", map[string]any{"ingressRate": 1_000_000, "ingressBurst": uint64(linkspec.MaxBandwidthBurst) + 1}, "runtimeConfig.bandwidth.ingressBurst: 34359738360 bits is more than"},
		{"rate over 1 Pbit/s", map[string]any{"egressRate": uint64(2e15), "egressBurst": 1000}, "runtimeConfig.bandwidth.egressRate: 2000000000000000 bit/s is not in"},
		{"not an object", "10M", "runtimeConfig.bandwidth"},
	} {
		for _, kind := range []string{node.KindTap, node.KindShm, node.KindVeth} {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				plugin := maps.Clone(n.PluginConfig())
				b, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": node.NetworkName, "plugins": []any{plugin}})
				if err != nil {
					t.Fatal(err)
				}
				l, err := libcni.NetworkConfFromBytes(b)
				if err != nil {
					t.Fatal(err)
				}
				x, err := n.NewPodNetNS()
				if err != nil {
					t.Fatal(err)
				}
				rt := node.RuntimeConf("bad", "e2e-bad", x.Path(), kind)
				rt.CapabilityArgs = map[string]any{"bandwidth": tc.bw}
				_, err = n.CNIAdd(ctx, n.CNI(t.TempDir()), l, rt)
				wantCode(t, "ADD", err, codeInvalidConfig)
				if err != nil && !strings.Contains(err.Error(), tc.want) {
					t.Errorf("ADD: %v; want the error to say %q", err, tc.want)
				}
				t.Logf("ADD: %v", err)
				wantLinks(t, x, "lo")
				wantLinks(t, n.Host, "lo", node.Uplink, "out0")
				wantNoAttachments(t, ctx, n)
				// DEL does not read the capability: the runtime can
				// always clean up.
				if err := n.CNIDel(ctx, n.CNI(t.TempDir()), l, rt); err != nil {
					t.Errorf("DEL after the refused ADD: %v", err)
				}
				if err := node.DeleteNetNS(x); err != nil {
					t.Error(err)
				}
			})
		}
	}
}
