package main

import (
	"math"
	"strings"
	"testing"

	"github.com/shm-cni/shm-cni/internal/hoptrace"
)

// roundTrip appends one round trip's records starting at t0 (µs), each hop
// of traceHops taking hop(i) µs, with stray records between them: another
// role's marks, the hop's role's other points, and, when woken, a sleep and
// wake of the receive loop ending the second hop.
func roundTrip(events []traceEvent, t0 float64, hop func(int) float64, woken bool) ([]traceEvent, float64) {
	ns := func(us float64) int64 { return int64(math.Round(us * 1e3)) }
	events = append(events, traceEvent{at: ns(t0), role: roleClient, point: hoptrace.App})
	t := t0
	for i, h := range traceHops {
		d := hop(i)
		// Noise halfway: a point that ends no hop here.
		events = append(events, traceEvent{at: ns(t + d/2), role: roleEcho, point: hoptrace.Sleep})
		if i == 1 && woken {
			events = append(events, traceEvent{at: ns(t + d/3), role: roleAgent, point: hoptrace.Sleep},
				traceEvent{at: ns(t + 2*d/3), role: roleAgent, point: hoptrace.Wake})
		}
		t += d
		if i < len(traceHops)-1 {
			events = append(events, traceEvent{at: ns(t), role: h.role, point: h.point})
		}
	}
	return events, t
}

func TestAnalyzeTrace(t *testing.T) {
	var events []traceEvent
	at := 100.0
	for k := range 5 {
		events, at = roundTrip(events, at, func(i int) float64 { return float64(i+1) + float64(k) }, k%2 == 0)
	}
	// The last write, which ends the fifth round trip; then a round trip
	// that stops halfway (its agent never took the frame) and the next
	// write.
	events = append(events, traceEvent{at: int64(at * 1e3), role: roleClient, point: hoptrace.App},
		traceEvent{at: int64(at*1e3) + 2000, role: roleClient, point: hoptrace.Tx},
		traceEvent{at: int64(at*1e3) + 9000, role: roleClient, point: hoptrace.App})
	r := analyzeTrace(events)
	if r.RoundTrips != 5 || r.Incomplete != 1 {
		t.Fatalf("round trips %d, incomplete %d; want 5, 1", r.RoundTrips, r.Incomplete)
	}
	var sum float64
	for i, h := range r.Hops {
		// Hop i took i+1+k µs in round trip k = 0..4: median and mean i+3.
		if want := float64(i + 3); math.Abs(h.MedianUs-want) > 0.01 || math.Abs(h.MeanUs-want) > 0.01 {
			t.Errorf("hop %d (%s): median %.3f, mean %.3f; want %.0f", i, h.Name, h.MedianUs, h.MeanUs, want)
		}
		sum += h.MeanUs
		switch {
		case traceHops[i].point != hoptrace.Rx && h.Woken != nil:
			t.Errorf("hop %d: woken %v for a hop that ends at no receive", i, *h.Woken)
		case i == 1 && (h.Woken == nil || math.Abs(*h.Woken-0.6) > 1e-9):
			t.Errorf("hop 1: woken %v, want 0.6 (3 of 5)", h.Woken)
		case traceHops[i].point == hoptrace.Rx && i != 1 && (h.Woken == nil || *h.Woken != 0):
			t.Errorf("hop %d: woken %v, want 0", i, h.Woken)
		}
	}
	if math.Abs(r.MeanUs-sum) > 0.01 {
		t.Errorf("mean round trip %.3f, hops sum to %.3f", r.MeanUs, sum)
	}
	// The echo's stray sleep in every hop; the agent's in 3 of 5 round trips.
	if want := float64(len(traceHops)); r.Sleeps[roleEcho] != want || r.Sleeps[roleAgent] != 0.6 || r.Sleeps[roleClient] != 0 {
		t.Errorf("sleeps per round trip %v, want echo %.0f, agent 0.6, client 0", r.Sleeps, want)
	}
	rep := &report{Trace: &r}
	var b strings.Builder
	rep.traceMarkdown(&b)
	if got := strings.Count(b.String(), "\n| "); got != len(traceHops)+1 {
		t.Errorf("trace table has %d rows, want %d:\n%s", got, len(traceHops)+1, b.String())
	}
}

func TestAnalyzeTraceEmpty(t *testing.T) {
	r := analyzeTrace(nil)
	if r.RoundTrips != 0 || r.MeanUs != 0 {
		t.Fatalf("%+v", r)
	}
	r.Error = "no complete round trip traced"
	rep := &report{Trace: &r}
	var b strings.Builder
	rep.traceMarkdown(&b)
	if !strings.Contains(b.String(), "Not traced: no complete round trip traced.") {
		t.Errorf("got %q", b.String())
	}
}
