package e2e

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// settlePoll is how often a settling counter is read again.
const settlePoll = 50 * time.Millisecond

// agentFootprint is what an agent holds that a pod may leak.
type agentFootprint struct {
	fds, memfdMaps, goroutines int
	// stacks are the agent's goroutines by stack at the reading, for
	// the message of a test that finds more of them than before.
	stacks string
}

func (f agentFootprint) String() string {
	return fmt.Sprintf("%d fds, %d memfd mappings, %d goroutines", f.fds, f.memfdMaps, f.goroutines)
}

// exceeds says whether f holds more of anything than base.
func (f agentFootprint) exceeds(base agentFootprint) bool {
	return f.fds > base.fds || f.memfdMaps > base.memfdMaps || f.goroutines > base.goroutines
}

// checkFootprint fails t if got holds more than base, naming what and, for
// goroutines, showing both readings' stacks: a goroutine that outlives its
// pod shows there with where it waits.
func checkFootprint(t *testing.T, what string, got, base agentFootprint) {
	t.Helper()
	if !got.exceeds(base) {
		return
	}
	t.Errorf("agent holds %v %s, %v before", got, what, base)
	if got.goroutines > base.goroutines {
		t.Logf("the agent's goroutines before:\n%s\nand %s:\n%s", base.stacks, what, got.stacks)
	}
}

// footprint reads the agent's open fds and memfd mappings (/proc) and its
// goroutines (their stacks, and their count but for those serving the
// readings: node.CountGoroutines).
func footprint(ctx context.Context, n *node.Node) (agentFootprint, error) {
	pid := n.Agent().PID()
	var f agentFootprint
	var err error
	if f.fds, err = node.FDCount(pid); err != nil {
		return f, err
	}
	if f.memfdMaps, err = node.MemfdMappings(pid); err != nil {
		return f, err
	}
	if f.stacks, err = n.GoroutineStacks(ctx); err != nil {
		return f, err
	}
	f.goroutines, err = node.CountGoroutines(f.stacks)
	return f, err
}

// settledFootprint reads the footprint until no part of it exceeds base
// (goroutines and descriptors of a detached link end asynchronously) or
// ctx ends, and returns the last reading.
func settledFootprint(ctx context.Context, n *node.Node, base agentFootprint) (agentFootprint, error) {
	for {
		f, err := footprint(ctx, n)
		if err != nil {
			return f, err
		}
		if !f.exceeds(base) {
			return f, nil
		}
		select {
		case <-ctx.Done():
			return f, nil
		case <-time.After(settlePoll):
		}
	}
}

// TestAddDelCyclesLeakNothing runs 200 ADD/DEL cycles in one pod netns,
// alternating kinds (shm, tap, shm, veth), with a sandbox session and traffic on every tenth shm
// link and a bandwidth limit on every other veth link: afterwards the agent holds no more fds, memfd mappings or
// goroutines than after the first cycles, no attachment or address, and
// neither the pod netns nor the host has a device left behind.
func TestAddDelCyclesLeakNothing(t *testing.T) {
	const cycles = 200
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	x, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	host := n.HostPeer()
	var base agentFootprint
	cycle := func(i int) error {
		kind := node.KindTap
		switch {
		case i%2 == 1:
			kind = node.KindShm
		case i%4 == 2:
			kind = node.KindVeth
		}
		// Every other veth pod has a bandwidth limit: qdiscs and an
		// ifb device on the host, which DEL must take along.
		var caps map[string]any
		if i%8 == 2 {
			caps = map[string]any{"bandwidth": bandwidthLimit}
		}
		p, err := n.AddPodIn(ctx, fmt.Sprintf("cycle%d", i), kind, x, caps)
		if err != nil {
			return err
		}
		// Sessions: a sandbox sends to the host and goes; the next
		// DEL finds the link without a sandbox.
		if kind == node.KindShm && i%20 == 1 {
			if _, err := n.Transfer(ctx, n.PodPeer(p), host, false, 64<<10); err != nil {
				return err
			}
		}
		// A live sandbox session shows in the footprint: the counters
		// see what a pod holds, so their return to the base means
		// something.
		if kind == node.KindShm && i == 7 {
			if _, err := n.Transfer(ctx, host, n.PodPeer(p), false, 64<<10); err != nil {
				return err
			}
			live, err := footprint(ctx, n)
			if err != nil {
				return err
			}
			t.Logf("with a sandbox connected: %v", live)
			if live.memfdMaps == 0 || live.fds <= base.fds || live.goroutines <= base.goroutines {
				t.Errorf("footprint with a sandbox connected: %v, want more of each than %v", live, base)
			}
		}
		// And a kernel pod receives, on either kind of link.
		if kind != node.KindShm && i%20 <= 2 {
			if _, err := n.Transfer(ctx, host, n.PodPeer(p), true, 64<<10); err != nil {
				return err
			}
		}
		return n.DeletePod(ctx, p)
	}
	// Warm up: the first cycles of each kind grow pools and caches for
	// good (the Go runtime's, gVisor's).
	for i := range 4 {
		if err := cycle(i); err != nil {
			t.Fatalf("warm-up cycle %d: %v", i, err)
		}
	}
	settle, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	base, err = settledFootprint(settle, n, agentFootprint{fds: 1 << 30, memfdMaps: 1 << 30, goroutines: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after the warm-up: %v", base)

	for i := 4; i < cycles+4; i++ {
		if err := cycle(i); err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
	}

	settle, cancel = context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	got, err := settledFootprint(settle, n, base)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after %d cycles: %v", cycles, got)
	checkFootprint(t, fmt.Sprintf("after %d cycles", cycles), got, base)
	if base.memfdMaps != 0 {
		t.Errorf("agent memfd mappings with no pod: %d, want 0", base.memfdMaps)
	}
	wantNoAttachments(t, ctx, n)
	wantLinks(t, x, "lo")
	wantLinks(t, n.Host, "lo", node.Uplink, "out0")
	if ents, err := os.ReadDir(n.SandboxDir()); err != nil || len(ents) != 0 {
		t.Errorf("sandbox dir: %d entries (%v), want none", len(ents), err)
	}
}
