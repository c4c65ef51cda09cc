package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// churnPods is how many pods TestChurn adds and deletes, in waves of
// churnWave; under the race detector (a race-built agent) it runs
// churnPodsRace, and make test-full runs the whole churn without it.
// SHM_CNI_CHURN_PODS overrides both.
const (
	churnPods     = 1000
	churnPodsRace = 200
	churnWave     = 100
)

// TestChurn adds and deletes pods in waves of 100 concurrent ADDs then 100
// concurrent DELs, a third of each kind (tap, shm, veth), while two
// long-lived kernel pods keep one TCP connection busy and a long-lived
// sandbox takes transfers. Every wave's pods carry traffic. It checks that
// no address is ever held twice, that every ADD and DEL succeeds, and that
// afterwards the agent holds what it held before the churn: the same
// attachments, allocations and sandbox sockets, no more fds, memfd mappings
// or goroutines, and its heap is back near its baseline; and the host no
// veth link's host side (the agent deletes them without its operation
// lock, concurrently).
func TestChurn(t *testing.T) {
	total := churnPods
	if raceAgent() {
		total = churnPodsRace
	}
	if s := os.Getenv("SHM_CNI_CHURN_PODS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 {
			t.Fatalf("SHM_CNI_CHURN_PODS=%q: want a positive number", s)
		}
		total = v
	}
	ctx := testContext(t)
	n := newNode(t, node.Options{})
	k1, k2, s1 := addPod(t, ctx, n, "live-k1", node.KindTap), addPod(t, ctx, n, "live-k2", node.KindTap), addPod(t, ctx, n, "live-s1", node.KindShm)
	if _, err := n.Transfer(ctx, n.PodPeer(k1), n.PodPeer(s1), false, 1<<20); err != nil {
		t.Fatal(err)
	}
	s1.StopServer()
	base, err := footprint(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	saveHeapProfile(t, ctx, n, "before")
	baseHeap, err := n.Metric(ctx, "go_memstats_heap_inuse_bytes", nil)
	if err != nil {
		t.Fatal(err)
	}
	baseRSS, _ := n.Metric(ctx, "process_resident_memory_bytes", nil)
	baseAtts := attachmentKeys(t, ctx, n)
	baseAllocs, err := n.Allocations()
	if err != nil {
		t.Fatal(err)
	}
	baseSockets := dirEntries(t, n.SandboxDir())

	ping := startPinger(t, k1.NS, k2.NS, k2.Addr4)
	// The reference: the same exchanges between the host and the outside
	// netns, over a veth pair the agent has no part in.
	control := startPinger(t, n.Host, n.Outside, node.Outside4.Addr())
	live := map[netip.Addr]string{}
	for _, p := range []*node.Pod{k1, k2, s1} {
		live[p.Addr4], live[p.Addr6] = p.Name, p.Name
	}
	start := time.Now()
	var firstHeap float64
	var addTimes, delTimes []time.Duration
	for w := 0; w*churnWave < total; w++ {
		size := min(churnWave, total-w*churnWave)
		pods := make([]*node.Pod, size)
		errs := make([]error, size)
		took := make([]time.Duration, size)
		var wg sync.WaitGroup
		for i := range size {
			kind := []string{node.KindTap, node.KindShm, node.KindVeth}[i%3]
			wg.Go(func() {
				t0 := time.Now()
				pods[i], errs[i] = n.AddPod(ctx, fmt.Sprintf("w%d-%d", w, i), kind)
				took[i] = time.Since(t0)
			})
		}
		wg.Wait()
		addTimes = append(addTimes, took...)
		for i, p := range pods {
			if errs[i] != nil {
				t.Fatalf("wave %d: ADD %d: %v", w, i, errs[i])
			}
			for _, a := range []netip.Addr{p.Addr4, p.Addr6} {
				if other, dup := live[a]; dup {
					t.Fatalf("wave %d: %s got %s, which %s holds", w, p.Name, a, other)
				}
				live[a] = p.Name
			}
		}
		// Traffic on the live ones: the first and last of each kind,
		// and the long-lived sandbox.
		for _, tr := range [][2]*node.Pod{{pods[0], pods[size-1]}, {pods[size-1], s1}, {k2, pods[min(1, size-1)]}, {pods[min(2, size-1)], pods[0]}} {
			if _, err := n.Transfer(ctx, n.PodPeer(tr[0]), n.PodPeer(tr[1]), w%2 == 1, 1<<20); err != nil {
				t.Errorf("wave %d: %v", w, err)
			}
		}
		for i, p := range pods {
			wg.Go(func() {
				t0 := time.Now()
				errs[i] = n.DeletePod(ctx, p)
				took[i] = time.Since(t0)
			})
		}
		wg.Wait()
		delTimes = append(delTimes, took...)
		for i, p := range pods {
			if errs[i] != nil {
				t.Fatalf("wave %d: DEL %d: %v", w, i, errs[i])
			}
			delete(live, p.Addr4)
			delete(live, p.Addr6)
		}
		if _, err := ping.since(start); err != nil {
			t.Fatalf("wave %d: the long-lived connection: %v", w, err)
		}
		if w == 0 {
			// The first wave grows what is grown once (maps,
			// pools); later waves must not grow the heap further.
			saveHeapProfile(t, ctx, n, "first-wave")
			if firstHeap, err = n.Metric(ctx, "go_memstats_heap_inuse_bytes", nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	exchanges, err := ping.since(start)
	if err != nil {
		t.Fatalf("the long-lived connection: %v", err)
	}
	ping.halt()
	control.halt()
	s1.StopServer()
	t.Logf("%d pods in %v; ADD p50 %v p99 %v, DEL p50 %v p99 %v (concurrent waves of %d); the long-lived connection made %d exchanges, longest pause %v (over a veth pair meanwhile: %v)",
		total, time.Since(start).Round(time.Millisecond), quantile(addTimes, 0.5), quantile(addTimes, 0.99),
		quantile(delTimes, 0.5), quantile(delTimes, 0.99), churnWave, exchanges, ping.longestGap().Round(time.Millisecond),
		control.longestGap().Round(time.Millisecond))

	for _, p := range []*node.Pod{k1, k2} {
		m := map[string]string{"container_id": p.RT.ContainerID}
		rx, _ := n.Metric(ctx, "shm_cni_link_drops_total", map[string]string{"container_id": p.RT.ContainerID, "direction": "receive"})
		tx, _ := n.Metric(ctx, "shm_cni_link_drops_total", map[string]string{"container_id": p.RT.ContainerID, "direction": "transmit"})
		ep, _ := n.Metric(ctx, "shm_cni_link_endpoint_drops_total", m)
		t.Logf("long-lived %s: router drops receive %v transmit %v, endpoint drops %v", p.Name, rx, tx, ep)
	}
	if got := attachmentKeys(t, ctx, n); fmt.Sprint(got) != fmt.Sprint(baseAtts) {
		t.Errorf("attachments after the churn %v, want %v", got, baseAtts)
	}
	if got, err := n.Allocations(); err != nil || fmt.Sprint(got) != fmt.Sprint(baseAllocs) {
		t.Errorf("allocations after the churn %v (%v), want %v", got, err, baseAllocs)
	}
	if got := dirEntries(t, n.SandboxDir()); fmt.Sprint(got) != fmt.Sprint(baseSockets) {
		t.Errorf("sandbox sockets after the churn %v, want %v", got, baseSockets)
	}
	if links, err := node.LinkNames(n.Host); err != nil {
		t.Error(err)
	} else if left := slices.DeleteFunc(links, func(l string) bool { return !strings.HasPrefix(l, "shmv") && !strings.HasPrefix(l, "shmb") }); len(left) > 0 {
		t.Errorf("veth links' host sides and ifb devices after the churn: %v", left)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	f, err := settledFootprint(sctx, n, base)
	if err != nil {
		t.Fatal(err)
	}
	checkFootprint(t, "after the churn", f, base)
	// Live heap, after a collection, against its level after the first
	// wave: a leak of 4 KiB per pod exceeds the bound from 500 pods on
	// (the full churn); the race-built agent's heap varies more.
	saveHeapProfile(t, ctx, n, "after")
	heap, err := n.Metric(ctx, "go_memstats_heap_inuse_bytes", nil)
	if err != nil {
		t.Fatal(err)
	}
	rss, _ := n.Metric(ctx, "process_resident_memory_bytes", nil)
	t.Logf("agent heap in use %.1f MiB before, %.1f MiB after the first wave, %.1f MiB after all; RSS %.1f MiB before, %.1f MiB after",
		baseHeap/(1<<20), firstHeap/(1<<20), heap/(1<<20), baseRSS/(1<<20), rss/(1<<20))
	slack := 1 << 20
	if raceAgent() {
		slack = 4 << 20
	}
	if limit := firstHeap + float64(slack) + float64(total-churnWave)*(2<<10); heap > limit {
		t.Errorf("agent heap in use %.1f MiB after the churn, %.1f MiB after its first wave (limit %.1f MiB)", heap/(1<<20), firstHeap/(1<<20), limit/(1<<20))
	}
}

// dirEntries lists the names in dir.
func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// quantile returns the q-quantile of ds (nearest rank), rounded to 0.1 ms.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))].Round(100 * time.Microsecond)
}

// saveHeapProfile takes the agent's heap profile (after a GC) and, when
// SHM_CNI_HEAP_PROFILES names a directory, saves it there as
// churn-heap-<name>.pb.gz (compare with go tool pprof -base).
func saveHeapProfile(t *testing.T, ctx context.Context, n *node.Node, name string) {
	t.Helper()
	// Two collections: sync.Pool contents (the metrics handler's gzip
	// writers, say) survive one.
	if err := n.GC(ctx); err != nil {
		t.Fatal(err)
	}
	b, err := n.HeapProfile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if dir := os.Getenv("SHM_CNI_HEAP_PROFILES"); dir != "" {
		if err := os.WriteFile(filepath.Join(dir, "churn-heap-"+name+".pb.gz"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
