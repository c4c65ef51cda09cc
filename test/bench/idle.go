package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// idleCIDRs make room for hundreds of pods.
var idleCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/22"), netip.MustParsePrefix("fd00:10:244::/64")}

// settle is how long the agent is left alone after pods were added.
const settle = 3 * time.Second

// runIdle measures the agent's RSS and CPU with each count of idle
// attached tap pods, adding pods as the count grows.
func (b *bench) runIdle(ctx context.Context, rep *report) error {
	counts := slices.Clone(b.cfg.idlePods)
	slices.Sort(counts)
	n, err := b.newNode(ctx, node.Options{PodCIDRs: idleCIDRs})
	if err != nil {
		return err
	}
	defer b.closeNode(n)
	pid := n.Agent().PID()
	have := 0
	window := b.cfg.idleWindow / time.Duration(b.cfg.reps)
	var base float64
	for _, want := range counts {
		b.log.Info("idle agent", "pods", want, "window", b.cfg.idleWindow)
		if err := addIdlePods(ctx, n, have, want); err != nil {
			return err
		}
		have = max(have, want)
		if err := sleep(ctx, settle); err != nil {
			return err
		}
		row := idleRow{Pods: want}
		for range b.cfg.reps {
			c0, err := cpuSeconds(pid)
			if err != nil {
				return err
			}
			t0 := time.Now()
			if err := sleep(ctx, window); err != nil {
				return err
			}
			c1, err := cpuSeconds(pid)
			if err != nil {
				return err
			}
			rss, err := rssKiB(pid)
			if err != nil {
				return err
			}
			row.CPUPercent = append(row.CPUPercent, 100*(c1-c0)/time.Since(t0).Seconds())
			row.RSSMiB = append(row.RSSMiB, rss/1024)
		}
		row.MedianCPU, row.MedianRSS = median(row.CPUPercent), median(row.RSSMiB)
		if len(rep.Idle) == 0 && want == 0 {
			base = row.MedianRSS
		}
		if want > 0 && len(rep.Idle) > 0 && rep.Idle[0].Pods == 0 {
			row.PerPodKiB = (row.MedianRSS - base) * 1024 / float64(want)
		}
		b.log.Info("idle agent", "pods", want, "RSS MiB", fmt.Sprintf("%.1f", row.MedianRSS), "CPU %", fmt.Sprintf("%.2f", row.MedianCPU))
		rep.Idle = append(rep.Idle, row)
	}
	rep.rateIdle()
	return nil
}

// addIdlePods adds tap pods idle<from>..idle<to-1>, a few at a time.
func addIdlePods(ctx context.Context, n *node.Node, from, to int) error {
	const workers = 4
	next := make(chan int)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for range workers {
		wg.Go(func() {
			for i := range next {
				if _, err := n.AddPod(ctx, fmt.Sprintf("idle%d", i), node.KindTap); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	for i := from; i < to && ctx.Err() == nil; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	if len(errs) > 0 {
		return errs[0]
	}
	return ctx.Err()
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
