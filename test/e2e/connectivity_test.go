package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/shm-cni/shm-cni/test/e2e/node"
	"github.com/shm-cni/shm-cni/test/e2e/pattern"
)

// TestConnectivityMatrix proves every path of a node over IPv4 and IPv6 with
// a verified TCP transfer: kernel pod <-> kernel pod, sandbox <-> sandbox,
// kernel <-> sandbox, host <-> each kind, and each pod -> outside, where
// the outside must see the host's address (masquerade) while every
// receiver inside the node sees the sender's own address.
func TestConnectivityMatrix(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	k1, k2, s1, s2 := fourPods(t, ctx, n)
	matrix(t, ctx, n, k1, k2, s1, s2)
}

// matrix checks every path between pods and the host, and from each of
// them to the outside, both families (node.Matrix), logs the table and
// fails t for every path that failed.
func matrix(t *testing.T, ctx context.Context, n *node.Node, pods ...*node.Pod) {
	t.Helper()
	srcs := []*node.Peer{n.HostPeer()}
	for _, p := range pods {
		srcs = append(srcs, n.PodPeer(p))
	}
	dsts := append(append([]*node.Peer{}, srcs...), n.OutsidePeer())
	checks := n.Matrix(ctx, srcs, dsts, 1<<20)
	var table bytes.Buffer
	node.PrintMatrix(&table, srcs, dsts, checks)
	t.Logf("connectivity (IPv4/IPv6):\n%s", table.String())
	// Every source to every other peer and the outside, both families.
	if got, want := len(checks), 2*len(srcs)*len(srcs); got != want {
		t.Errorf("ran %d checks, want %d", got, want)
	}
	for _, c := range checks {
		if c.Err != nil {
			t.Error(c.Err)
		}
	}
}

// TestBulkTransfers moves a large verified TCP stream across every pair
// kind, in both directions where the kinds differ, over IPv4 and IPv6:
// 100 MiB each. Every byte is checked by the receiver, and the receiver
// must see the sender's own address. It runs the plain agent and sandbox
// whatever raceAgent says: race-built they are too slow for such sizes.
func TestBulkTransfers(t *testing.T) {
	n := newNodeWith(t, node.Options{}, false)
	ctx := testContext(t)
	k1, k2, s1, s2 := fourPods(t, ctx, n)
	host, outside := n.HostPeer(), n.OutsidePeer()
	const size = 100 << 20
	for _, tc := range []struct {
		name     string
		src, dst *node.Peer
	}{
		{"kernel-kernel", n.PodPeer(k1), n.PodPeer(k2)},
		{"sandbox-sandbox", n.PodPeer(s1), n.PodPeer(s2)},
		{"kernel-sandbox", n.PodPeer(k1), n.PodPeer(s1)},
		{"sandbox-kernel", n.PodPeer(s2), n.PodPeer(k2)},
		{"host-kernel", host, n.PodPeer(k1)},
		{"kernel-host", n.PodPeer(k2), host},
		{"host-sandbox", host, n.PodPeer(s1)},
		{"sandbox-host", n.PodPeer(s2), host},
		// Through the uplink and the host's masquerade: a sandbox's
		// small segments are joined into super-packets on the way
		// (pkg/endpoint/shm/coalesce.go).
		{"kernel-outside", n.PodPeer(k1), outside},
		{"sandbox-outside", n.PodPeer(s1), outside},
	} {
		for _, v6 := range []bool{false, true} {
			fam := "IPv4"
			if v6 {
				fam = "IPv6"
			}
			t.Run(tc.name+"/"+fam, func(t *testing.T) {
				tr, err := n.Transfer(ctx, tc.src, tc.dst, v6, size)
				if err != nil {
					t.Fatal(err)
				}
				if got, want := tr.From, n.ExpectedSource(tc.src, tc.dst, v6); got != want {
					t.Errorf("the receiver saw source %s, want %s", got, want)
				}
				t.Logf("%s verified, %.0f MiB/s", mib(tr.Bytes), tr.MiBps())
			})
		}
	}
}

// TestEgressWithoutMasquerade runs the agent with --masquerade=false and
// an outside network that routes the pod CIDRs back through the host:
// the outside then sees each pod's own address (where the matrix, with
// masquerade, requires the host's), over IPv4 and IPv6.
func TestEgressWithoutMasquerade(t *testing.T) {
	n := newNode(t, node.Options{NoMasquerade: true})
	ctx := testContext(t)
	if err := n.RouteOutsideToPods(); err != nil {
		t.Fatal(err)
	}
	k := addPod(t, ctx, n, "k", node.KindTap)
	s := addPod(t, ctx, n, "s", node.KindShm)
	outside := n.OutsidePeer()
	for _, src := range []*node.Peer{n.PodPeer(k), n.PodPeer(s)} {
		for _, v6 := range []bool{false, true} {
			tr, err := n.Transfer(ctx, src, outside, v6, 1<<20)
			if err != nil {
				t.Error(err)
				continue
			}
			if tr.From != src.Addr(v6) {
				t.Errorf("%s -> outside: the outside saw %s, want the pod's own %s", src.Name, tr.From, src.Addr(v6))
			}
		}
	}
}

// TestFastPath: verified transfers between pods take the router's fast path
// (shm_cni_link_fast_path_packets_total): every packet from sandbox to
// sandbox, and the acknowledgements of a kernel pod's stream (its data, the
// kernel's TCP super-packets, cross through the netstack, see pkg/endpoint/gso.go); with
// --fast-path=false the same transfers pass and nothing takes it. Its
// agents run with --one-copy=false, and no frame goes in one copy.
func TestFastPath(t *testing.T) {
	for _, fast := range []bool{true, false} {
		t.Run(fmt.Sprintf("fast-path=%t", fast), func(t *testing.T) {
			n := newNode(t, node.Options{ExtraAgentArgs: []string{fmt.Sprintf("--fast-path=%t", fast), "--one-copy=false"}})
			ctx := testContext(t)
			k1, k2, s1, s2 := fourPods(t, ctx, n)
			metric := func(p *node.Pod, name string, labels ...string) float64 {
				t.Helper()
				match := map[string]string{"container_id": p.RT.ContainerID}
				for i := 0; i+1 < len(labels); i += 2 {
					match[labels[i]] = labels[i+1]
				}
				v, err := n.Metric(ctx, name, match)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
			for _, v6 := range []bool{false, true} {
				for _, pair := range [][2]*node.Pod{{s1, s2}, {k1, k2}} {
					if _, err := n.Transfer(ctx, n.PodPeer(pair[0]), n.PodPeer(pair[1]), v6, 4<<20); err != nil {
						t.Fatalf("%s -> %s (IPv6 %t): %v", pair[0].Name, pair[1].Name, v6, err)
					}
				}
			}
			s1Rx := metric(s1, "shm_cni_link_receive_packets_total")
			s1Fast := metric(s1, "shm_cni_link_fast_path_packets_total", "direction", "receive")
			s2Fast := metric(s2, "shm_cni_link_fast_path_packets_total", "direction", "transmit")
			k2Fast := metric(k2, "shm_cni_link_fast_path_packets_total", "direction", "receive")
			t.Logf("s1 sent %.0f packets, %.0f on the fast path; s2 got %.0f on it; k2 sent %.0f on it", s1Rx, s1Fast, s2Fast, k2Fast)
			if oneCopy := metric(s2, "shm_cni_link_one_copy_total"); oneCopy != 0 {
				t.Errorf("with --one-copy=false, s2 got %.0f frames in one copy", oneCopy)
			}
			if !fast {
				if s1Fast+s2Fast+k2Fast != 0 {
					t.Errorf("fast path off, yet it carried %.0f packets", s1Fast+s2Fast+k2Fast)
				}
				return
			}
			// s1's link carried only the transfers to s2 (and, maybe, a few
			// neighbour messages).
			if s1Fast < 0.95*s1Rx {
				t.Errorf("s1 sent %.0f packets, only %.0f on the fast path", s1Rx, s1Fast)
			}
			if s2Fast == 0 || k2Fast == 0 {
				t.Errorf("fast path: s2 received %.0f, k2 sent %.0f; want both > 0", s2Fast, k2Fast)
			}
		})
	}
}

// TestOneCopy runs the default agent (--one-copy on): verified transfers
// from a sandbox to a sandbox, to a kernel pod and beyond the node arrive
// whole, in both families, and the links to the sandbox and the kernel pod
// count frames written straight from the sender's shared memory
// (shm_cni_link_one_copy_total); with --one-copy=false they count none
// (TestFastPath's nodes).
func TestOneCopy(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	k1, _, s1, s2 := fourPods(t, ctx, n)
	for _, v6 := range []bool{false, true} {
		for _, dst := range []*node.Peer{n.PodPeer(s2), n.PodPeer(k1), n.OutsidePeer()} {
			if _, err := n.Transfer(ctx, n.PodPeer(s1), dst, v6, 16<<20); err != nil {
				t.Fatalf("s1 -> %s (IPv6 %t): %v", dst.Name, v6, err)
			}
		}
	}
	for _, p := range []*node.Pod{s2, k1} {
		v, err := n.Metric(ctx, "shm_cni_link_one_copy_total", map[string]string{"container_id": p.RT.ContainerID})
		if err != nil {
			t.Fatal(err)
		}
		// 32 MiB in segments of up to 64 KiB: at least a frame per
		// 128 KiB on average.
		if v < 256 {
			t.Errorf("%s: %.0f frames in one copy, want at least 256", p.Name, v)
		}
	}
}

// TestSandboxRoundTrips runs the benchmark's netstack client (the sandbox
// program's rtt mode) against an echo sandbox through the agent, over IPv4
// and IPv6: each count read on its stdin yields as many round trips, each
// request echoed unchanged; a bad count ends it with an error, the end of
// its stdin without one.
func TestSandboxRoundTrips(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	s1, s2 := addPod(t, ctx, n, "s1", node.KindShm), addPod(t, ctx, n, "s2", node.KindShm)
	echo, err := n.StartSandbox(s2, "--mode", "echo", "--port", "7001")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := echo.WaitLine(ctx, "ready"); err != nil {
		t.Fatal(err)
	}
	for _, to := range []netip.Addr{s2.Addr4, s2.Addr6} {
		addr := netip.AddrPortFrom(to, 7001).String()
		c, err := n.StartSandbox(s1, "--mode", "rtt", "--to", addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitLine(ctx, "ready"); err != nil {
			t.Fatal(err)
		}
		for _, count := range []int{50, 7} {
			if err := c.WriteLine(strconv.Itoa(count)); err != nil {
				t.Fatal(err)
			}
			l, err := c.WaitLine(ctx, pattern.RoundTripPrefix)
			if err != nil {
				t.Fatal(err)
			}
			ds, err := pattern.ParseRoundTrips(l)
			if err != nil {
				t.Fatal(err)
			}
			if len(ds) != count {
				t.Errorf("to %s: asked for %d round trips, got %d", addr, count, len(ds))
			}
		}
		if to.Is4() {
			// A count that is none ends the client with an error.
			if err := c.WriteLine("many"); err != nil {
				t.Fatal(err)
			}
			if err := c.Wait(ctx); err == nil || !strings.Contains(err.Error(), `"many" is not a positive count`) {
				t.Errorf("to %s: after a bad count: %v, want the count refused", addr, err)
			}
			continue
		}
		if err := c.CloseInput(); err != nil {
			t.Fatal(err)
		}
		if err := c.Wait(ctx); err != nil {
			t.Errorf("to %s: after the end of stdin: %v", addr, err)
		}
	}
}
