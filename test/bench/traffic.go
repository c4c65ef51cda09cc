package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// echoPort is where the sandbox echo server listens.
const echoPort = 7001

// tputCase measures throughput with a number of parallel streams.
type tputCase struct {
	name, tool string
	ref        bool
	measure    func(ctx context.Context, streams int) (tputSample, error)
}

// tputSample is one throughput measurement: the rate and the bytes moved;
// with sandbox senders, how their TCP fared (summed over the streams).
type tputSample struct {
	bitsPerSecond float64
	bytes         float64
	sender        *node.SenderTCP
}

// rttCase measures 64-byte round trips.
type rttCase struct {
	name, tool string
	ref        bool
	measure    func(ctx context.Context) ([]time.Duration, error)
}

// runTraffic sets up the veth pair, the reference plugins' pods and an
// shm-cni node with its pods, then measures throughput and latency of
// every case, rep by rep so that drift of the machine hits all alike.
func (b *bench) runTraffic(ctx context.Context, rep *report) error {
	log := b.log
	traceDir := filepath.Join(b.tmp, "hoptrace")
	if b.cfg.cases["trace"] {
		// Before the agent and the sandboxes start: they inherit it.
		if err := os.Mkdir(traceDir, 0o700); err != nil {
			return err
		}
		if err := startTracing(traceDir); err != nil {
			return err
		}
		defer stopTracing()
	}
	log.Info("setting up: veth pair, ptp and bridge pods, shm-cni node and pods")
	va, vb, err := b.newVethPair()
	if err != nil {
		return err
	}
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
	pa, pb, err := b.refPods(ctx, ptp)
	if err != nil {
		return err
	}
	ba, bb, err := b.refPods(ctx, br)
	if err != nil {
		return err
	}
	// The benchmark measures the path: the sandboxes count bytes and send
	// zeros (the tests verify data).
	n, err := b.newNode(ctx, node.Options{MTU: b.cfg.mtu, ShmMTU: b.cfg.shmMTU, NoVerify: true})
	if err != nil {
		return err
	}
	add := func(name, kind string) (*node.Pod, error) { return n.AddPod(ctx, name, kind) }
	k1, err := add("k1", node.KindTap)
	if err != nil {
		return err
	}
	k2, err := add("k2", node.KindTap)
	if err != nil {
		return err
	}
	kbw, err := n.AddPodWith(ctx, "kbw", node.KindTap, map[string]any{"bandwidth": benchLimit})
	if err != nil {
		return err
	}
	// Kernel pods on veth links: the host's kernel routes them.
	v1, err := add("v1", node.KindVeth)
	if err != nil {
		return err
	}
	v2, err := add("v2", node.KindVeth)
	if err != nil {
		return err
	}
	vbw, err := n.AddPodWith(ctx, "vbw", node.KindVeth, map[string]any{"bandwidth": benchLimit})
	if err != nil {
		return err
	}
	// s0 receives; s1..sN send (one sandbox per link); e0 serves echo;
	// c0 is the netstack client's link (the sandbox program's rtt mode).
	maxStreams := 1
	for _, s := range b.cfg.streams {
		maxStreams = max(maxStreams, s)
	}
	s0, err := add("s0", node.KindShm)
	if err != nil {
		return err
	}
	senders := make([]*node.Pod, maxStreams)
	for i := range senders {
		if senders[i], err = add("s"+strconv.Itoa(i+1), node.KindShm); err != nil {
			return err
		}
	}
	e0, err := add("e0", node.KindShm)
	if err != nil {
		return err
	}
	c0, err := add("c0", node.KindShm)
	if err != nil {
		return err
	}
	echo, err := n.StartSandbox(e0, "--mode", "echo", "--port", strconv.Itoa(echoPort))
	if err != nil {
		return err
	}
	if _, err := echo.WaitLine(ctx, "ready"); err != nil {
		return err
	}
	// The reference a sandbox has without shm-cni, on the bridge plugin's
	// pods: without and with GSO.
	var pkts []*packetRef
	for _, gso := range []bool{false, true} {
		pk, err := b.newPacketRef(ctx, refHost, gso, maxStreams)
		if err != nil {
			return err
		}
		pkts = append(pkts, pk)
	}
	host := kend{"host", n.Host, n.Gateway4}
	kk1 := kend{"k1", k1.NS, k1.Addr4}
	kk2 := kend{"k2", k2.NS, k2.Addr4}
	kkbw := kend{"kbw", kbw.NS, kbw.Addr4}
	vv1 := kend{"v1", v1.NS, v1.Addr4}
	vv2 := kend{"v2", v2.NS, v2.Addr4}
	vvbw := kend{"vbw", vbw.NS, vbw.Addr4}
	// Beyond the node: the outside namespace behind the host, reached
	// through the uplink and the host's routing (masqueraded).
	outside := kend{"outside", n.Outside, node.Outside4.Addr()}
	e0Addr := netip.AddrPortFrom(e0.Addr4, echoPort)

	if b.cfg.cases["tput"] {
		for _, e := range []kend{vb, pb, bb, kk2, kkbw, vv2, vvbw, host, outside} {
			if err := b.iperfServer(ctx, e); err != nil {
				return err
			}
		}
		iperf := func(src, dst kend) func(context.Context, int) (tputSample, error) {
			return func(ctx context.Context, streams int) (tputSample, error) {
				return b.iperfClient(ctx, src, dst, streams)
			}
		}
		xfer := func(srcs []*node.Peer, dst *node.Peer) func(context.Context, int) (tputSample, error) {
			return func(ctx context.Context, streams int) (tputSample, error) {
				return transfers(ctx, n, srcs, dst, streams, b.cfg.amount())
			}
		}
		sandboxPeers := make([]*node.Peer, len(senders))
		for i, p := range senders {
			sandboxPeers[i] = n.PodPeer(p)
		}
		cases := []tputCase{
			{"veth pair", "iperf3", true, iperf(va, vb)},
			{"veth pair", "Go transfer", true, func(ctx context.Context, streams int) (tputSample, error) {
				return kernelTransfers(ctx, va, vb, streams, b.cfg.amount())
			}},
			{"ptp pod → pod", "iperf3", true, iperf(pa, pb)},
			{"bridge pod → pod", "iperf3", true, iperf(ba, bb)},
			{"shm-cni tap pod → tap pod", "iperf3", false, iperf(kk1, kk2)},
			{"shm-cni host → tap pod", "iperf3", false, iperf(host, kk2)},
			{"shm-cni tap pod → host", "iperf3", false, iperf(kk1, host)},
			{"shm-cni sandbox → host", "sandbox send", false, xfer(sandboxPeers, n.HostPeer())},
			{"shm-cni tap pod → sandbox", "sandbox sink", false, xfer([]*node.Peer{n.PodPeer(k1)}, n.PodPeer(s0))},
			{"shm-cni sandbox → tap pod", "sandbox send", false, xfer(sandboxPeers, n.PodPeer(k2))},
			{"shm-cni sandbox → sandbox", "sandbox send/sink", false, xfer(sandboxPeers, n.PodPeer(s0))},
			{"shm-cni tap pod → outside", "iperf3", false, iperf(kk1, outside)},
			{"shm-cni sandbox → outside", "sandbox send", false, xfer(sandboxPeers, n.OutsidePeer())},
			{limitedCase, "iperf3", false, iperf(kk1, kkbw)},
			{"shm-cni veth pod → veth pod", "iperf3", false, iperf(vv1, vv2)},
			{"shm-cni host → veth pod", "iperf3", false, iperf(host, vv2)},
			{"shm-cni veth pod → host", "iperf3", false, iperf(vv1, host)},
			{"shm-cni veth pod → sandbox", "sandbox sink", false, xfer([]*node.Peer{n.PodPeer(v1)}, n.PodPeer(s0))},
			{"shm-cni sandbox → veth pod", "sandbox send", false, xfer(sandboxPeers, n.PodPeer(v2))},
			{"shm-cni veth pod → outside", "iperf3", false, iperf(vv1, outside)},
			{vethLimitedCase, "iperf3", false, iperf(vv1, vvbw)},
		}
		for _, pk := range pkts {
			cases = append(cases, tputCase{pk.name("sandbox → sandbox (bridge)"), "sandbox send/sink", true,
				func(ctx context.Context, streams int) (tputSample, error) {
					return pk.transfer(ctx, streams, b.cfg.amount())
				}})
		}
		cases = selected(b, cases, func(c tputCase) (string, bool) { return c.name, c.ref })
		results := make([][]float64, len(cases)*len(b.cfg.streams))
		cpus := make([][]float64, len(results))
		agentCPUs := make([][]float64, len(results))
		sandboxCPUs := make([][]float64, len(results))
		errs := make([]string, len(results))
		senders := make([][]node.SenderTCP, len(results))
		agentDrops := make([][]int64, len(results))
		dropsOK := make([]bool, len(results))
		for k := range dropsOK {
			dropsOK[k] = true
		}
		for r := range b.cfg.reps {
			for i, c := range cases {
				for j, s := range b.cfg.streams {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					k := i*len(b.cfg.streams) + j
					// The agent's drops, for the sender table: only
					// where sandbox programs send (and it has rows).
					var drops0 int64
					var derr0 error
					sandboxSends := !c.ref && strings.HasPrefix(c.tool, "sandbox send")
					if sandboxSends {
						drops0, derr0 = agentTxDrops(ctx, n)
					}
					agent0, sandboxes0 := n.CPU()
					cpu0, cerr0 := busyCPUSeconds()
					v, err := c.measure(ctx, s)
					cpu1, cerr1 := busyCPUSeconds()
					agent1, sandboxes1 := n.CPU()
					if err != nil {
						log.Warn("throughput", "case", c.name, "streams", s, "rep", r+1, "err", err)
						errs[k] = err.Error()
						continue
					}
					results[k] = append(results[k], v.bitsPerSecond/1e9)
					if v.sender != nil {
						senders[k] = append(senders[k], *v.sender)
					}
					if v.sender != nil && sandboxSends {
						drops1, derr1 := agentTxDrops(ctx, n)
						if derr0 != nil || derr1 != nil {
							log.Warn("throughput: the agent's drops", "case", c.name, "err", errors.Join(derr0, derr1))
							dropsOK[k] = false
						}
						agentDrops[k] = append(agentDrops[k], drops1-drops0)
					}
					perGiB := 0.0
					if cerr0 == nil && cerr1 == nil && v.bytes > 0 {
						perGiB = (cpu1 - cpu0) / (v.bytes / (1 << 30))
						cpus[k] = append(cpus[k], perGiB)
					}
					if !c.ref && v.bytes > 0 {
						gib := v.bytes / (1 << 30)
						agentCPUs[k] = append(agentCPUs[k], (agent1-agent0).Seconds()/gib)
						sandboxCPUs[k] = append(sandboxCPUs[k], (sandboxes1-sandboxes0).Seconds()/gib)
					}
					log.Info("throughput", "case", c.name, "tool", c.tool, "streams", s, "rep", r+1,
						"Gbit/s", fmt.Sprintf("%.2f", v.bitsPerSecond/1e9), "CPU-s/GiB", fmt.Sprintf("%.2f", perGiB))
				}
			}
		}
		for i, c := range cases {
			for j, s := range b.cfg.streams {
				k := i*len(b.cfg.streams) + j
				rep.Throughput = append(rep.Throughput, tputRow{Case: c.name, Tool: c.tool, Reference: c.ref,
					Streams: s, Gbps: results[k], Median: median(results[k]),
					CPUPerGiB: cpus[k], MedianCPUPerGiB: median(cpus[k]),
					AgentCPUPerGiB: agentCPUs[k], MedianAgentCPUPerGiB: median(agentCPUs[k]),
					SandboxCPUPerGiB: sandboxCPUs[k], MedianSandboxCPUPerGiB: median(sandboxCPUs[k]), Senders: senders[k], Error: errs[k]})
				if dropsOK[k] {
					rep.Throughput[len(rep.Throughput)-1].AgentTxDrops = agentDrops[k]
				}
			}
		}
		rep.rateThroughput()
	}

	if b.cfg.cases["rtt"] {
		kernel := func(src, dst kend) func(context.Context) ([]time.Duration, error) {
			return func(ctx context.Context) ([]time.Duration, error) {
				return kernelRTT(ctx, src, dst, b.cfg.rttCount)
			}
		}
		cases := []rttCase{
			{"veth pair", "Go echo", true, kernel(va, vb)},
			{"ptp pod → pod", "Go echo", true, kernel(pa, pb)},
			{"bridge pod → pod", "Go echo", true, kernel(ba, bb)},
			{"shm-cni tap pod → tap pod", "Go echo", false, kernel(kk1, kk2)},
			{"shm-cni host → tap pod", "Go echo", false, kernel(host, kk2)},
			{"shm-cni tap pod → sandbox", "sandbox echo", false, func(ctx context.Context) ([]time.Duration, error) {
				return dialRTT(ctx, kk1, e0Addr, b.cfg.rttCount)
			}},
			{"shm-cni veth pod → veth pod", "Go echo", false, kernel(vv1, vv2)},
			{"shm-cni veth pod → sandbox", "sandbox echo", false, func(ctx context.Context) ([]time.Duration, error) {
				return dialRTT(ctx, vv1, e0Addr, b.cfg.rttCount)
			}},
			{"shm-cni sandbox → sandbox", "netstack client, sandbox echo", false, func(ctx context.Context) ([]time.Duration, error) {
				return netstackRTT(ctx, n, c0, e0Addr, b.cfg.rttCount)
			}},
		}
		for _, pk := range pkts {
			cases = append(cases,
				rttCase{pk.name("bridge pod → sandbox"), "sandbox echo", true, func(ctx context.Context) ([]time.Duration, error) {
					return dialRTT(ctx, pk.kernel, netip.AddrPortFrom(pk.echo.addr, packetEchoPort), b.cfg.rttCount)
				}},
				rttCase{pk.name("sandbox → sandbox (bridge)"), "netstack client, sandbox echo", true, func(ctx context.Context) ([]time.Duration, error) {
					return pk.rtt(ctx, b.cfg.rttCount)
				}})
		}
		cases = selected(b, cases, func(c rttCase) (string, bool) { return c.name, c.ref })
		p50s := make([][]float64, len(cases))
		p99s := make([][]float64, len(cases))
		errs := make([]string, len(cases))
		for r := range b.cfg.reps {
			for i, c := range cases {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				ds, err := c.measure(ctx)
				if err != nil {
					log.Warn("latency", "case", c.name, "rep", r+1, "err", err)
					errs[i] = err.Error()
					continue
				}
				p50s[i] = append(p50s[i], percentile(ds, 50))
				p99s[i] = append(p99s[i], percentile(ds, 99))
				log.Info("latency", "case", c.name, "rep", r+1, "p50 µs", fmt.Sprintf("%.1f", percentile(ds, 50)), "p99 µs", fmt.Sprintf("%.1f", percentile(ds, 99)))
			}
		}
		for i, c := range cases {
			rep.Latency = append(rep.Latency, rttRow{Case: c.name, Tool: c.tool, Reference: c.ref,
				P50us: p50s[i], P99us: p99s[i], MedianP50: median(p50s[i]), MedianP99: median(p99s[i]), Error: errs[i]})
		}
		rep.rateLatency()
	}
	if b.cfg.cases["trace"] && ctx.Err() == nil {
		t := traceRTT(ctx, traceDir, n, c0, e0Addr, echo.PID(), b.cfg.rttCount)
		if t.Error != "" {
			log.Warn("trace", "err", t.Error)
		} else {
			log.Info("trace", "round trips", t.RoundTrips, "traced p50 µs", fmt.Sprintf("%.1f", t.TracedP50us), "untraced p50 µs", fmt.Sprintf("%.1f", t.UntracedP50us))
		}
		rep.Trace = &t
	}
	return b.closeNode(n)
}

// selected returns the cases -only keeps: the references and those whose
// name matches.
func selected[C any](b *bench, cases []C, id func(C) (name string, ref bool)) []C {
	if b.cfg.only == nil {
		return cases
	}
	var out []C
	for _, c := range cases {
		if name, ref := id(c); ref || b.cfg.only.MatchString(name) {
			out = append(out, c)
		}
	}
	return out
}

// transfers runs streams transfers at once (the node counts bytes without
// checking them: Options.NoVerify), from srcs[i] (the first when there is
// one) to dst, and returns the aggregate rate: all bytes over the longest
// sender-measured duration.
func transfers(ctx context.Context, n *node.Node, srcs []*node.Peer, dst *node.Peer, streams int, amt node.Amount) (tputSample, error) {
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		total  int64
		sent   int64
		long   time.Duration
		errs   []error
		sender *node.SenderTCP
	)
	for i := range streams {
		src := srcs[min(i, len(srcs)-1)]
		wg.Go(func() {
			tr, err := n.TransferAmount(ctx, src, dst, false, amt, netip.Addr{})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			total += tr.Bytes
			sent += tr.Sent
			long = max(long, tr.Duration)
			if t := tr.Sender; t != nil {
				if sender == nil {
					sender = &node.SenderTCP{}
				}
				sender.Add(*t)
			}
		})
	}
	wg.Wait()
	if len(errs) == 0 && total != sent {
		// Timed transfers are checked here, by their sums (TransferAmount).
		errs = append(errs, fmt.Errorf("%d streams to %s: received %d bytes, want the %d sent", streams, dst.Name, total, sent))
	}
	if len(errs) > 0 {
		return tputSample{}, errs[0]
	}
	return tputSample{bitsPerSecond: float64(total) * 8 / long.Seconds(), bytes: float64(total), sender: sender}, nil
}

// agentTxDrops returns the frames the agent's link endpoints have dropped
// toward pods for want of room in their ring or queue, every link of n
// together.
func agentTxDrops(ctx context.Context, n *node.Node) (int64, error) {
	v, err := n.Metric(ctx, "shm_cni_link_endpoint_drops_total", map[string]string{"direction": "transmit"})
	return int64(v), err
}
