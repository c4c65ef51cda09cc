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
	"time"

	"github.com/shm-cni/shm-cni/pkg/agent"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// TestMeasureHostileNeighbour measures the well-behaved pods' throughput
// (kernel pod to kernel pod, kernel pod to sandbox; medians of 3 transfers
// of 64 MiB each; and a sandbox sender, s1->k2) alone and while a hostile
// sandbox misbehaves in each way, and logs the ratios; for several per-link
// receive limits of the agent (--link-max-pps) in the same run: the default,
// none, and those of SHM_CNI_MEASURE_PPS (comma-separated). The "spin" row is
// a sandbox that burns a CPU without touching its link: on a machine with
// few cores a flooder's own CPU already slows its neighbours, and "vs spin"
// is the part the agent's work for the flood adds. It is a measurement,
// not a check: it runs only with SHM_CNI_MEASURE=1 (make bench-hostile) and
// fails only when traffic does.
func TestMeasureHostileNeighbour(t *testing.T) {
	if os.Getenv("SHM_CNI_MEASURE") != "1" {
		t.Skip("a measurement: run with SHM_CNI_MEASURE=1 (make bench-hostile)")
	}
	type config struct {
		name string
		args []string
	}
	configs := []config{
		{fmt.Sprintf("default (--link-max-pps=%d)", agent.DefaultLinkMaxPPS), nil},
		{"no limit", []string{"--link-max-pps=0", "--link-max-bytes=0"}},
	}
	for _, pps := range strings.Split(os.Getenv("SHM_CNI_MEASURE_PPS"), ",") {
		if pps = strings.TrimSpace(pps); pps != "" {
			configs = append(configs, config{"--link-max-pps=" + pps, []string{"--link-max-pps=" + pps}})
		}
	}
	cg := newCPUCap(t, "shm-cni-hostile", 1)
	for _, cfg := range configs {
		t.Run(cfg.name, func(t *testing.T) {
			ctx := testContext(t)
			e := newHostileEnvWith(t, ctx, node.Options{ExtraAgentArgs: cfg.args})
			e.cpuCap = cg
			t.Logf("agent %s: well-behaved throughput beside a hostile sandbox (one run, same node):\n%s",
				cfg.name, e.measureNeighbours(t, ctx))
		})
	}
}

// measureNeighbours runs the measurement of TestMeasureHostileNeighbour on
// e and returns its table.
func (e *hostileEnv) measureNeighbours(t *testing.T, ctx context.Context) string {
	nobody := netip.AddrPortFrom(unassigned(t, e.n), 9)
	modes := []struct {
		name string
		args []string
	}{
		{"none", nil},
		{"spin", []string{"--mode", "spin", "--duration", "1h"}},
		{"flood", []string{"--mode", "flood", "--to", nobody.String(), "--duration", "1h"}},
		{"garbage", []string{"--mode", "garbage", "--duration", "1h"}},
		{"stall", []string{"--mode", "stall", "--duration", "1h"}},
		{"reconnect", []string{"--mode", "reconnect", "--count", "1000000"}},
	}
	pairs := [][2]*node.Pod{{e.k1, e.k2}, {e.k1, e.s1}, {e.s1, e.k2}}
	base := make([]float64, len(pairs))
	spin := make([]float64, len(pairs))
	var report strings.Builder
	report.WriteString("| hostile sandbox |")
	for _, p := range pairs {
		fmt.Fprintf(&report, " %s->%s MiB/s | ratio | vs spin |", p[0].Name, p[1].Name)
	}
	report.WriteString("\n|---|" + strings.Repeat("---|---|---|", len(pairs)) + "\n")
	for _, m := range modes {
		agentCPU0 := procCPU(t, e.n.Agent().PID())
		rx0 := e.metric(t, ctx, "shm_cni_link_receive_packets_total")
		thr0 := e.metric(t, ctx, "shm_cni_link_receive_throttled_total")
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
			switch m.name {
			case "none":
				base[i] = med
			case "spin":
				spin[i] = med
			}
			vsSpin := "-"
			if spin[i] > 0 {
				vsSpin = fmt.Sprintf("%.2f", med/spin[i])
			}
			row += fmt.Sprintf(" %.0f | %.2f | %s |", med, med/base[i], vsSpin)
		}
		stop()
		agentCPU := procCPU(t, e.n.Agent().PID()) - agentCPU0
		t.Logf("%s: agent CPU %v; the router received %.0f packets from the hostile sandbox, paused its link %.0f times",
			m.name, agentCPU.Round(10*time.Millisecond), e.metric(t, ctx, "shm_cni_link_receive_packets_total")-rx0,
			e.metric(t, ctx, "shm_cni_link_receive_throttled_total")-thr0)
		report.WriteString(row + "\n")
	}
	return report.String()
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
			e.cpuCap.add(t, sb.PID())
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
