package main

import (
	"encoding/xml"
	"strings"
	"testing"
)

// TestSVG: the plot is well-formed XML with a bar per 1-stream throughput
// case, per CPU ratio and per latency case, coloured by the side of 1x
// each is on, and skips cases that were not measured.
func TestSVG(t *testing.T) {
	r := &report{Started: "now", LoadBefore: "0.1"}
	r.Throughput = []tputRow{
		{Case: "veth pair", Tool: "iperf3", Streams: 1, Median: 10, Ratio: 1, CPURatio: 1},
		{Case: "shm-cni sandbox → sandbox", Tool: "sandbox send/sink", Streams: 1, Median: 1, Ratio: 0.1, CPURatio: 3},
		{Case: "veth pair", Tool: "iperf3", Streams: 4, Median: 20, Ratio: 1},
		{Case: "failed", Tool: "iperf3", Streams: 1},
	}
	r.Latency = []rttRow{{Case: "veth pair", Tool: "Go echo", MedianP50: 10, RatioP50: 1}, {Case: "x", Tool: "y", MedianP50: 5, RatioP50: 0.5}}
	s := r.svg()
	if err := xml.Unmarshal([]byte(s), new(struct{})); err != nil {
		t.Fatalf("not XML: %v\n%s", err, s)
	}
	if got, want := strings.Count(s, "<rect x="), 2+2+2; got != want {
		t.Errorf("%d bars, want %d:\n%s", got, want, s)
	}
	for _, want := range []string{"0.10x", "3.00x", "0.50x", "shm-cni sandbox → sandbox (sandbox send/sink)"} {
		if !strings.Contains(s, want) {
			t.Errorf("plot lacks %q", want)
		}
	}
	if strings.Contains(s, "failed") {
		t.Error("plot shows a case that was not measured")
	}
	// 0.1x throughput and 3x CPU are bad (red); 0.5x round trip is good.
	if got := strings.Count(s, `fill="#c0392b"`); got != 2 {
		t.Errorf("%d red bars, want 2", got)
	}
}
