package router

import "testing"

// TestFastPathToUplink proves, with real traffic through the host to an
// outside namespace, that a pod's TCP stream beyond the node takes the fast
// path to the uplink, its SYN aside (the MSS clamp), that the data arrives
// whole (SHA-256) and masqueraded.
func TestFastPathToUplink(t *testing.T) {
	e := newEnv(t, dualStackConfig(true))
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			before := e.r.UplinkStats()
			if got := tcpTransfer(t, e.a.ns, e.outside, f.outside); got != f.hostSide {
				t.Errorf("the outside saw %s, want the host's %s", got, f.hostSide)
			}
			after := e.r.UplinkStats()
			tx, fast := after.TxPackets-before.TxPackets, after.FastTxPackets-before.FastTxPackets
			t.Logf("to the host: %d packets, %d on the fast path", tx, fast)
			if fast == 0 || tx-fast < 1 || tx-fast > 2 {
				t.Errorf("%d of %d packets to the uplink took the fast path; want all but the SYN (and at most one more)", fast, tx)
			}
		})
	}
}
