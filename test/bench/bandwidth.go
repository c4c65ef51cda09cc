package main

import (
	"fmt"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// A kernel pod with a bandwidth limit (the CNI bandwidth capability)
// receives from another kernel pod, on tap links (the router's shaper) and
// on veth links (the host's tbf qdiscs): the throughput each gets against
// the limit, as a ratio, is one of the report's goals. The limit is far
// below what two such pods reach (about 10 Gbit/s), so the limit, not the
// path, sets the rate.
const (
	limitedCase     = "shm-cni tap pod → tap pod limited to 1 Gbit/s"
	vethLimitedCase = "shm-cni veth pod → veth pod limited to 1 Gbit/s"
	// limitBits is the limit, both ways, in bit/s; its burst is 10 ms of
	// it.
	limitBits = 1_000_000_000
)

var benchLimit = linkspec.Bandwidth{
	IngressRate: limitBits, IngressBurst: limitBits / 100,
	EgressRate: limitBits, EgressBurst: limitBits / 100,
}

// limitGoal adds the goals on the limited pods' throughput (1 stream) to
// r's goals through add: iperf3 counts TCP payload, the limit IP bytes. On
// a tap link they cross the router as 64 KiB super-packets with one set of
// headers each (0.1% of them), so a kept limit reads about 1.00x; a veth
// link's tbf counts every segment's headers (3% at MTU 1500), about 0.97x.
// 0.9x to 1.02x leaves room for the burst and for that.
func limitGoal(r *report, add func(name, want string, measured bool, value float64, got string, met bool)) {
	for _, c := range []struct{ name, row string }{
		{"a pod's bandwidth limit (1 Gbit/s, 1 stream): throughput against the limit", limitedCase},
		{"a pod's bandwidth limit on a veth link (1 Gbit/s, 1 stream): throughput against the limit", vethLimitedCase},
	} {
		t := r.tput(c.row, 1, "")
		ok := t != nil && t.Median > 0
		var v float64
		if ok {
			v = ratio(t.Median*1e9, limitBits)
		}
		add(c.name, "0.9x to 1.02x", ok, v, fmt.Sprintf("%.2fx", v), v >= 0.9 && v <= 1.02)
	}
}
