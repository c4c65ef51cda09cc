package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestReport: medians of each row and their ratios to the reference row,
// in the order rows first appear; CPU per GiB from the 1-stream runs, the
// machine's with a ratio, the agent's and the Sentries' without (the
// reference has neither), "-" where a row has none.
func TestReport(t *testing.T) {
	raw := `
network=bridge pair=runc-runc metric=tput streams=1 bytes=1250000000 seconds=1 cpu_s=2
network=bridge pair=runc-runc metric=tput streams=1 bytes=1000000000 seconds=1 cpu_s=2
network=bridge pair=runc-runc metric=tput streams=1 bytes=1500000000 seconds=1 cpu_s=2
network=bridge pair=runc-runc metric=rr p50_us=20 p99_us=40
network=tap pair=runsc-runsc metric=tput streams=1 bytes=125000000 seconds=1 cpu_s=1 agent_s=0.25 sentry_s=0.5
network=tap pair=runsc-runsc metric=tput streams=4 bytes=250000000 seconds=1 cpu_s=1 agent_s=9 sentry_s=9
network=tap pair=runsc-runsc metric=rr p50_us=200 p99_us=900
network=tap pair=runsc-runsc metric=rr p50_us=100 p99_us=300
network=tap pair=runsc-runsc metric=rr p50_us=300 p99_us=600
`
	var out bytes.Buffer
	if err := report(nil, strings.NewReader(raw), &out); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		// median 1.25e9 B/s = 10 Gbit/s; 2 CPU-s over 1.25e9/2^30 GiB.
		"| bridge | runc-runc | 10.00 (1.00x) | - | 1.72 (1.00x) | - | - | 20 (1.00x) | 40 (1.00x) |",
		// 0.25 and 0.5 CPU-s over 1.25e8/2^30 GiB; the 4-stream run's
		// CPU is not counted.
		"| tap | runsc-runsc | 1.00 (0.10x) | 2.00 | 8.59 (5.00x) | 2.15 | 4.29 | 200 (10.00x) | 600 (15.00x) |",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("report lacks %q:\n%s", want, got)
		}
	}
	if strings.Index(got, "| bridge |") > strings.Index(got, "| tap |") {
		t.Errorf("rows out of order:\n%s", got)
	}
}

// TestReportErrors: a raw line that cannot be read, or no reference row,
// is an error naming it.
func TestReportErrors(t *testing.T) {
	for _, tc := range []struct{ raw, want string }{
		{"network=tap pair=a metric=tput streams=1 bytes=x seconds=1", "line 1: bytes"},
		{"network=tap pair=a metric=tput streams=1 bytes=1 seconds=1 agent_s=x", "line 1: agent_s"},
		{"network=tap metric=rr p50_us=1 p99_us=2", "no network or pair"},
		{"network=tap pair=a metric=nope", `unknown metric "nope"`},
		{"network=tap pair=a metric=rr p50_us=1 p99_us=2", "no reference row bridge/runc-runc"},
	} {
		err := report(nil, strings.NewReader(tc.raw), &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want an error with %q", tc.raw, err, tc.want)
		}
	}
}
