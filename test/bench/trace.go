package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/shm-cni/shm-cni/internal/hoptrace"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The trace case: where a sandbox-to-sandbox 64 B round trip's time goes.
//
// The bench runs with hoptrace on (SHM_HOPTRACE_DIR in the environment of
// the agent and the sandbox programs). While the netstack client (the
// sandbox program's rtt mode) exchanges round trips with the echo sandbox
// through the agent, the three processes record when frames pass
// their links' receive and transmit, when a receive loop sleeps on its
// eventfd and wakes, and the applications' writes; each round trip is then
// cut into its hops, from the client's write of a request to its next.
// A mark is a clock reading and a store in a mapped file: the traced round
// trips take about as long as untraced ones, which the report shows.

// traceRole is one of the three programs on a traced round trip's path.
type traceRole string

const (
	roleClient traceRole = "client"
	roleAgent  traceRole = "agent"
	roleEcho   traceRole = "echo"
)

// traceHops are a round trip's hops, in order: each ends at the first
// record of its role and point after the previous hop's end. The first
// starts at the client's write of a request; the last ends at its next.
var traceHops = []struct {
	role  traceRole
	point hoptrace.Point
	name  string
}{
	{roleClient, hoptrace.Tx, "client: write → its link sends (netstack TCP, IP)"},
	{roleAgent, hoptrace.Rx, "agent takes the request from the client's ring"},
	{roleAgent, hoptrace.Tx, "agent routes it to the echo's link"},
	{roleEcho, hoptrace.Rx, "echo sandbox takes it from its ring"},
	{roleEcho, hoptrace.Delivered, "echo: netstack's inline receive (IP, TCP demultiplexing)"},
	{roleEcho, hoptrace.Read, "echo: TCP processing and hand-offs until the application's read returns"},
	{roleEcho, hoptrace.App, "echo: application writes the reply"},
	{roleEcho, hoptrace.Tx, "echo: write → its link sends (netstack TCP, IP)"},
	{roleAgent, hoptrace.Rx, "agent takes the reply from the echo's ring"},
	{roleAgent, hoptrace.Tx, "agent routes it to the client's link"},
	{roleClient, hoptrace.Rx, "client takes it from its ring"},
	{roleClient, hoptrace.Delivered, "client: netstack's inline receive"},
	{roleClient, hoptrace.Read, "client: TCP processing and hand-offs until the application's read returns"},
	{roleClient, hoptrace.App, "client: application writes the next request"},
}

// traceEvent is one record of one process.
type traceEvent struct {
	at    int64 // nanoseconds
	role  traceRole
	point hoptrace.Point
}

// traceHop is one hop's share of the traced round trips.
type traceHop struct {
	Name     string  `json:"name"`
	MedianUs float64 `json:"medianUs"`
	MeanUs   float64 `json:"meanUs"`
	// Woken is the share of the hop's round trips in which a receive loop
	// of the process that takes the frame slept and was woken during the
	// hop (the agent has one per link; hops that end at a receive only).
	Woken   *float64  `json:"wokenFraction,omitempty"`
	samples []float64 // µs
}

// traceReport is the trace case's result.
type traceReport struct {
	RoundTrips    int                   `json:"roundTrips"` // traced and cut into hops
	Incomplete    int                   `json:"incomplete"` // traced round trips missing a hop
	TracedP50us   float64               `json:"tracedP50us"`
	UntracedP50us float64               `json:"untracedP50us"` // just before, recording off
	MeanUs        float64               `json:"meanUs"`        // mean of the hops' sums
	Hops          []traceHop            `json:"hops"`
	Sleeps        map[traceRole]float64 `json:"sleepsPerRoundTrip"` // eventfd waits per round trip
	Error         string                `json:"error,omitempty"`
}

// analyzeTrace cuts events (in time order) into round trips, from one
// write of the client to its next.
func analyzeTrace(events []traceEvent) traceReport {
	rep := traceReport{Sleeps: map[traceRole]float64{}, Hops: make([]traceHop, len(traceHops))}
	for i, h := range traceHops {
		rep.Hops[i].Name = h.name
	}
	var starts []int
	for i, e := range events {
		if e.role == roleClient && e.point == hoptrace.App {
			starts = append(starts, i)
		}
	}
	woken := make([]int, len(traceHops))
	sleeps := map[traceRole]int{}
	var total float64
	durs := make([]float64, len(traceHops))
	wake := make([]bool, len(traceHops))
	for k := 0; k+1 < len(starts); k++ {
		from, to := starts[k], starts[k+1]
		prev, j, ok := from, from+1, true
		for h, hop := range traceHops {
			wake[h] = false
			for j <= to && (events[j].role != hop.role || events[j].point != hop.point) {
				if events[j].role == hop.role && events[j].point == hoptrace.Wake {
					wake[h] = true
				}
				j++
			}
			if j > to {
				ok = false
				break
			}
			durs[h] = float64(events[j].at-events[prev].at) / 1e3
			prev = j
			j++
		}
		if !ok {
			rep.Incomplete++
			continue
		}
		rep.RoundTrips++
		for h := range traceHops {
			rep.Hops[h].samples = append(rep.Hops[h].samples, durs[h])
			total += durs[h]
			if wake[h] {
				woken[h]++
			}
		}
		for _, e := range events[from:to] {
			if e.point == hoptrace.Sleep {
				sleeps[e.role]++
			}
		}
	}
	if rep.RoundTrips == 0 {
		return rep
	}
	n := float64(rep.RoundTrips)
	rep.MeanUs = total / n
	for h := range rep.Hops {
		s := rep.Hops[h].samples
		rep.Hops[h].MedianUs = median(s)
		var sum float64
		for _, d := range s {
			sum += d
		}
		rep.Hops[h].MeanUs = sum / n
		if traceHops[h].point == hoptrace.Rx {
			w := float64(woken[h]) / n
			rep.Hops[h].Woken = &w
		}
	}
	for _, r := range []traceRole{roleClient, roleAgent, roleEcho} {
		rep.Sleeps[r] = float64(sleeps[r]) / n
	}
	return rep
}

// startTracing turns hoptrace on, through the environment, for the agent
// and sandboxes started from now on.
func startTracing(dir string) error { return os.Setenv(hoptrace.EnvDir, dir) }

// stopTracing keeps the processes started from now on (the other cases')
// from tracing.
func stopTracing() { os.Unsetenv(hoptrace.EnvDir) }

// traceRTT traces count round trips from a netstack client on the shm pod
// p to the echo sandbox (pid echoPID) at to, through n's agent; dir holds
// the processes' trace files.
func traceRTT(ctx context.Context, dir string, n *node.Node, p *node.Pod, to netip.AddrPort, echoPID, count int) traceReport {
	rep, err := traceRTTErr(ctx, dir, n, p, to, echoPID, count)
	if err != nil {
		rep.Error = err.Error()
	}
	return rep
}

func traceRTTErr(ctx context.Context, dir string, n *node.Node, p *node.Pod, to netip.AddrPort, echoPID, count int) (rep traceReport, err error) {
	// At most a ring's worth of records per process: about ten a round trip.
	count = min(count, hoptrace.Records/16)
	// One client and connection: untraced round trips, then traced ones.
	err = withShmClient(ctx, n, p, to, func(c *rttClient) error {
		var err error
		rep, err = traceRounds(ctx, dir, c, n.Agent().PID(), echoPID, count)
		return err
	})
	return rep, err
}

// traceRounds makes count untraced round trips on c, then count traced
// ones, and cuts the latter into hops.
func traceRounds(ctx context.Context, dir string, c *rttClient, agentPID, echoPID, count int) (rep traceReport, err error) {
	untraced, err := c.round(ctx, count)
	if err != nil {
		return rep, fmt.Errorf("untraced round trips: %w", err)
	}
	roles := map[traceRole]int{roleClient: c.pid, roleAgent: agentPID, roleEcho: echoPID}
	files := map[traceRole]*hoptrace.File{}
	defer func() {
		// Off on every path: a process left recording would fill its
		// ring for the rest of the run.
		for _, f := range files {
			f.Record(false)
			f.Close()
		}
	}()
	for role, pid := range roles {
		f, err := hoptrace.Open(dir, pid)
		if err != nil {
			return rep, fmt.Errorf("%s's trace: %w", role, err)
		}
		files[role] = f
		f.Record(true)
	}
	traced, rttErr := c.round(ctx, count)
	for _, f := range files {
		f.Record(false)
	}
	if rttErr != nil {
		return rep, fmt.Errorf("traced round trips: %w", rttErr)
	}
	var events []traceEvent
	for role, f := range files {
		recs, lost := f.Records()
		if lost > 0 {
			return rep, fmt.Errorf("%s's trace lost %d records", role, lost)
		}
		for _, r := range recs {
			events = append(events, traceEvent{at: r.At, role: role, point: r.Point})
		}
	}
	slices.SortStableFunc(events, func(a, b traceEvent) int { return cmp.Compare(a.at, b.at) })
	rep = analyzeTrace(events)
	rep.UntracedP50us = percentile(untraced, 50)
	rep.TracedP50us = percentile(traced, 50)
	if rep.RoundTrips == 0 {
		return rep, errors.New("no complete round trip traced")
	}
	return rep, nil
}
