package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// cniOps adds and deletes one pod in a namespace.
type cniOps struct {
	name string
	ref  bool
	add  func(ctx context.Context, id string, x ns.NetNS) error
	del  func(ctx context.Context, id string, x ns.NetNS) error
}

// runCNI measures ADD and DEL latency of cniPods pods added at once, then
// deleted at once, through libcni: shm-cni (veth pods, the manifest's
// kind, and tap pods) against ptp and bridge.
func (b *bench) runCNI(ctx context.Context, rep *report) error {
	b.log.Info("CNI latency", "pods", b.cfg.cniPods)
	n, err := b.newNode(ctx, node.Options{PodCIDRs: idleCIDRs})
	if err != nil {
		return err
	}
	defer b.closeNode(n)
	l, err := n.NetworkList()
	if err != nil {
		return err
	}
	shm := n.CNI(filepath.Join(b.tmp, "cache-shm"))
	refHost, err := b.newRefHost()
	if err != nil {
		return err
	}
	ptp, err := b.newRefNet("ptp", ptpSubnet, refHost)
	if err != nil {
		return err
	}
	br, err := b.newRefNet("bridge", bridgeSubnet, refHost)
	if err != nil {
		return err
	}
	ref := func(r *refNet) cniOps {
		return cniOps{name: r.name, ref: true,
			add: func(ctx context.Context, id string, x ns.NetNS) error { _, err := r.add(ctx, id, x); return err },
			del: r.del}
	}
	ours := func(kind string) cniOps {
		return cniOps{name: "shm-cni (" + kind + ")",
			add: func(ctx context.Context, id string, x ns.NetNS) error {
				_, err := n.CNIAdd(ctx, shm, l, node.RuntimeConf(id, id, x.Path(), kind))
				return err
			},
			del: func(ctx context.Context, id string, x ns.NetNS) error {
				return n.CNIDel(ctx, shm, l, node.RuntimeConf(id, id, x.Path(), kind))
			}}
	}
	cases := []cniOps{ours(node.KindVeth), ours(node.KindTap), ref(ptp), ref(br)}
	rows := make([]cniRow, len(cases))
	for i, c := range cases {
		rows[i].Plugin, rows[i].Reference = c.name, c.ref
	}
	for r := range b.cfg.reps {
		for i, c := range cases {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			adds, dels, use, err := b.cniRound(ctx, c, r)
			if err != nil {
				b.log.Warn("CNI latency", "plugin", c.name, "rep", r+1, "err", err)
				rows[i].Error = err.Error()
				continue
			}
			row := &rows[i]
			row.AddP50ms = append(row.AddP50ms, percentile(adds, 50)/1000)
			row.AddP99ms = append(row.AddP99ms, percentile(adds, 99)/1000)
			row.DelP50ms = append(row.DelP50ms, percentile(dels, 50)/1000)
			row.DelP99ms = append(row.DelP99ms, percentile(dels, 99)/1000)
			row.AddCPUms = append(row.AddCPUms, use[0].busyMs)
			row.DelCPUms = append(row.DelCPUms, use[1].busyMs)
			row.AddProcCPUms = append(row.AddProcCPUms, use[0].procMs)
			row.AddProcFaults = append(row.AddProcFaults, use[0].procFaults)
			b.log.Info("CNI latency", "plugin", c.name, "rep", r+1,
				"ADD p50 ms", fmt.Sprintf("%.1f", percentile(adds, 50)/1000), "ADD p99 ms", fmt.Sprintf("%.1f", percentile(adds, 99)/1000),
				"DEL p50 ms", fmt.Sprintf("%.1f", percentile(dels, 50)/1000), "DEL p99 ms", fmt.Sprintf("%.1f", percentile(dels, 99)/1000),
				"ADD CPU ms", fmt.Sprintf("%.1f", use[0].busyMs), "DEL CPU ms", fmt.Sprintf("%.1f", use[1].busyMs),
				"ADD processes' CPU ms", fmt.Sprintf("%.1f", use[0].procMs), "ADD processes' page faults", fmt.Sprintf("%.0f", use[0].procFaults))
		}
	}
	for i := range rows {
		rows[i].finish()
	}
	rep.CNI = rows
	rep.rateCNI()
	return nil
}

// cniUsage is what one phase of a CNI round cost, per pod: the machine's
// busy CPU milliseconds, and the CPU milliseconds and minor page faults of
// the plugins' processes alone (with what they ran: an IPAM plugin).
type cniUsage struct {
	busyMs, procMs, procFaults float64
}

// cniRound adds cniPods pods at once, then deletes them at once, each in a
// fresh namespace, and returns each ADD's and DEL's time and what each phase
// cost per pod.
func (b *bench) cniRound(ctx context.Context, c cniOps, round int) (adds, dels []time.Duration, use [2]cniUsage, err error) {
	count := b.cfg.cniPods
	nss := make([]ns.NetNS, count)
	defer func() {
		for _, x := range nss {
			node.DeleteNetNS(x) // also deleted by close if this fails
		}
	}()
	for i := range nss {
		if nss[i], err = b.newNS(); err != nil {
			return nil, nil, use, err
		}
	}
	id := func(i int) string { return fmt.Sprintf("bench-cni-%d-%d", round, i) }
	phase := func(op func(context.Context, string, ns.NetNS) error, u *cniUsage) ([]time.Duration, error) {
		ds := make([]time.Duration, count)
		cpu0, cerr0 := busyCPUSeconds()
		proc0, faults0, perr0 := childrenUsage()
		errs := make([]error, count)
		var wg sync.WaitGroup
		for i := range count {
			wg.Go(func() {
				start := time.Now()
				errs[i] = op(ctx, id(i), nss[i])
				ds[i] = time.Since(start)
			})
		}
		wg.Wait()
		if cpu1, cerr1 := busyCPUSeconds(); cerr0 == nil && cerr1 == nil {
			u.busyMs = (cpu1 - cpu0) * 1000 / float64(count)
		}
		if proc1, faults1, perr1 := childrenUsage(); perr0 == nil && perr1 == nil {
			u.procMs = (proc1 - proc0) * 1000 / float64(count)
			u.procFaults = (faults1 - faults0) / float64(count)
		}
		for _, err := range errs {
			if err != nil {
				return nil, err
			}
		}
		return ds, nil
	}
	adds, err = phase(c.add, &use[0])
	if err != nil {
		// Delete what was added; DEL is idempotent.
		phase(c.del, &use[1])
		return nil, nil, use, err
	}
	dels, err = phase(c.del, &use[1])
	return adds, dels, use, err
}
