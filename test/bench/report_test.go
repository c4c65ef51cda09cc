package main

import (
	"strings"
	"testing"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// TestSenderMarkdown checks the sandbox senders' table: one line per case
// whose senders are sandbox programs, their runs in order, and none
// without any.
func TestSenderMarkdown(t *testing.T) {
	r := &report{Throughput: []tputRow{
		{Case: "veth pair", Streams: 1, Gbps: []float64{18}},
		{Case: "shm-cni sandbox → outside", Streams: 1, Gbps: []float64{3.25, 6.1},
			Senders:      []node.SenderTCP{{Segments: 12000, Acks: 6000, Retransmits: 5, Recoveries: 4, Spurious: 3, Timeouts: 2, LinkDrops: 1}, {Segments: 8200, Acks: 2050}},
			AgentTxDrops: []int64{7, 0}},
		// The agent's drops unread: a dash per run.
		{Case: "shm-cni sandbox → sandbox", Streams: 4, Gbps: []float64{5},
			Senders: []node.SenderTCP{{Segments: 100, Acks: 50}}},
	}}
	var b strings.Builder
	r.senderMarkdown(&b)
	out := b.String()
	for _, want := range []string{
		"| shm-cni sandbox → outside | 1 | 3.25 6.10 | 4 (3) 0 (0) | 2 0 | 1 0 | 7 0 | 5 0 | 2.0 4.0 |\n",
		"| shm-cni sandbox → sandbox | 4 | 5.00 | 0 (0) | 0 | 0 | - | 0 | 2.0 |\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("sender table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "veth pair") {
		t.Errorf("sender table lists a case without sandbox senders:\n%s", out)
	}
	b.Reset()
	(&report{Throughput: r.Throughput[:1]}).senderMarkdown(&b)
	if b.Len() != 0 {
		t.Errorf("sender table without sandbox senders: %q, want nothing", b.String())
	}
}

// TestTransferLength checks the report's sentence on how long each
// throughput measurement ran: timed by default, fixed bytes with -bytes.
func TestTransferLength(t *testing.T) {
	for _, c := range []struct {
		cfg  map[string]string
		want string
	}{
		{map[string]string{"time": "3s", "bytes": "0"}, "runs for 3s (-time)"},
		{map[string]string{"time": "3s", "bytes": "1073741824"}, "send 1073741824 bytes each (-bytes)"},
		{map[string]string{"iperf-time": "3s", "bytes": "67108864"}, "iperf3 runs for 3s; the Go and sandbox programs' transfers send 67108864 bytes"},
	} {
		if got := transferLength(c.cfg); !strings.Contains(got, c.want) {
			t.Errorf("transferLength(%v) = %q, want it to say %q", c.cfg, got, c.want)
		}
	}
}

// TestCNIMarkdown checks the CNI table: each plugin's medians of latency,
// of the machine's CPU per ADD and DEL and of an ADD's processes' CPU and
// page faults, and both ADD ratios to bridge.
func TestCNIMarkdown(t *testing.T) {
	r := &report{Config: map[string]string{"cni-pods": "100"}, CNI: []cniRow{
		{Plugin: "shm-cni (veth)", AddP50ms: []float64{900, 1000, 950}, AddP99ms: []float64{1200, 1400, 1300},
			DelP50ms: []float64{800, 800, 800}, DelP99ms: []float64{1100, 1100, 1100},
			AddCPUms: []float64{28, 26, 30}, DelCPUms: []float64{25, 24, 26},
			AddProcCPUms: []float64{11, 12, 10}, AddProcFaults: []float64{420, 430, 425}},
		{Plugin: "bridge", Reference: true, AddP50ms: []float64{1800}, AddP99ms: []float64{2600},
			DelP50ms: []float64{1400}, DelP99ms: []float64{2000},
			AddCPUms: []float64{56}, DelCPUms: []float64{44},
			AddProcCPUms: []float64{22}, AddProcFaults: []float64{809}},
	}}
	for i := range r.CNI {
		r.CNI[i].finish()
	}
	r.rateCNI()
	var b strings.Builder
	r.markdown(&b)
	for _, want := range []string{
		"| shm-cni (veth) | 950.0 | 1300.0 | 800.0 | 1100.0 | 0.50x | 28.0 | 25.0 | 0.50x | 11.0 | 425 |\n",
		"| bridge | 1800.0 | 2600.0 | 1400.0 | 2000.0 | 1.00x | 56.0 | 44.0 | 1.00x | 22.0 | 809 |\n",
		"during the 100 ADDs (or DELs), per pod",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("CNI table lacks %q:\n%s", want, b.String())
		}
	}
}
