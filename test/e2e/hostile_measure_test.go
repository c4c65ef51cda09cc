package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// TestMeasureHostileNeighbour measures the well-behaved pods' throughput
// (kernel pod to kernel pod, kernel pod to sandbox; medians of 3 transfers
// of 64 MiB each) alone and while a hostile sandbox misbehaves in each way,
// and logs the ratios. It is a measurement, not a check: it runs only with
// SHM_CNI_MEASURE=1 (make bench-hostile) and fails only when traffic does.
func TestMeasureHostileNeighbour(t *testing.T) {
	if os.Getenv("SHM_CNI_MEASURE") != "1" {
		t.Skip("a measurement: run with SHM_CNI_MEASURE=1 (make bench-hostile)")
	}
	ctx := testContext(t)
	e := newHostileEnv(t, ctx)
	nobody := netip.AddrPortFrom(unassigned(t, e.n), 9)
	modes := []struct {
		name string
		args []string
	}{
		{"none", nil},
		{"garbage", []string{"--mode", "garbage", "--duration", "1h"}},
		{"flood", []string{"--mode", "flood", "--to", nobody.String(), "--duration", "1h"}},
		{"stall", []string{"--mode", "stall", "--duration", "1h"}},
		{"reconnect", []string{"--mode", "reconnect", "--count", "1000000"}},
	}
	pairs := [][2]*node.Pod{{e.k1, e.k2}, {e.k1, e.s1}}
	base := make([]float64, len(pairs))
	var report strings.Builder
	fmt.Fprintf(&report, "| hostile sandbox | k1->k2 MiB/s | ratio | k1->s1 MiB/s | ratio |\n|---|---|---|---|---|\n")
	for _, m := range modes {
		stop := e.keepHostile(t, ctx, m.args)
		row := fmt.Sprintf("| %s |", m.name)
		for i, p := range pairs {
			var rates []float64
			for range 3 {
				tr, err := e.n.Transfer(ctx, e.n.PodPeer(p[0]), e.n.PodPeer(p[1]), false, 64<<20)
				if err != nil {
					t.Fatalf("%s: %v", m.name, err)
				}
				rates = append(rates, tr.MiBps())
			}
			slices.Sort(rates)
			med := rates[1]
			if m.name == "none" {
				base[i] = med
			}
			row += fmt.Sprintf(" %.0f | %.2f |", med, med/base[i])
		}
		stop()
		report.WriteString(row + "\n")
	}
	t.Logf("well-behaved throughput beside a hostile sandbox (one run, same node):\n%s", report.String())
}

// keepHostile runs the hostile program with args on h, again whenever it
// ends (cut off, say), until the returned stop is called. No args: nothing.
func (e *hostileEnv) keepHostile(t *testing.T, ctx context.Context, args []string) (stop func()) {
	if args == nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			sb, err := e.n.StartHostile(e.h, args...)
			if err != nil {
				t.Error(err)
				return
			}
			done := make(chan struct{})
			go func() { sb.Wait(ctx); close(done) }()
			select {
			case <-done:
			case <-ctx.Done():
				sb.Stop()
				<-done
			}
		}
	})
	return func() { cancel(); wg.Wait() }
}
