package router

import (
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// TestFastPathToUplink proves, with real traffic, that a pod's TCP stream
// takes the fast path to the uplink, its SYN aside (the MSS clamp), and
// arrives whole (SHA-256): beyond the node, through the host to an outside
// namespace (masqueraded), and to the host itself at the node gateway
// address, inside the pod CIDRs (from the pod's own address; the slow path
// forwarded all of it before).
func TestFastPathToUplink(t *testing.T) {
	e := newEnv(t, dualStackConfig(true))
	for _, f := range families {
		for _, c := range []struct {
			name     string
			server   ns.NetNS
			to, from netip.Addr // from: the client the server must see
		}{
			{"beyond the node", e.outside, f.outside, f.hostSide},
			{"to the host", e.host, f.nodeGW, f.a},
		} {
			t.Run(f.name+"/"+c.name, func(t *testing.T) { transferFastToUplink(t, e, c.server, c.to, c.from) })
		}
	}
}

// transferFastToUplink sends a TCP stream from e's pod a to "to" in server
// (tcpTransfer), which must see the client from; every packet of it that
// went to the uplink but the SYN (and at most one more) must have taken
// the fast path.
func transferFastToUplink(t *testing.T, e *env, server ns.NetNS, to, from netip.Addr) {
	t.Helper()
	before := e.r.UplinkStats()
	if got := tcpTransfer(t, e.a.ns, server, to); got != from {
		t.Errorf("the server saw client %s, want %s", got, from)
	}
	after := e.r.UplinkStats()
	tx, fast := after.TxPackets-before.TxPackets, after.FastTxPackets-before.FastTxPackets
	t.Logf("to the uplink: %d packets, %d on the fast path", tx, fast)
	if fast == 0 || tx-fast < 1 || tx-fast > 2 {
		t.Errorf("%d of %d packets to the uplink took the fast path; want all but the SYN (and at most one more)", fast, tx)
	}
}

// TestFastPathFromUplink proves, with real traffic from an outside
// namespace through the host, that what the uplink brings for a pod takes
// the fast path, all but the SYN (whose MSS the slow path clamps), to a
// kernel pod on a TAP device with a virtio-net header, the host's
// super-packets whole; and that streams from the outside arrive intact
// (SHA-256, or echoed back) on that path and the others: to a kernel pod on
// a plain TAP device and to a sandbox with checksum offload, whose links
// take only some of the host's super-packets whole (the rest gVisor cuts,
// as before). Both families; the pod sees the client's own address.
func TestFastPathFromUplink(t *testing.T) {
	e := newEnv(t, dualStackConfig(true))
	vnet := newKernelPodWith(t, e.r, "pod-v", true, podV4, podV6)
	sb := newSandboxPodWith(t, e.r, "pod-s", sandboxOpts{mac: 0x30, rxGSO: true}, podS4, podS6)
	const port, size = 7000, 8 << 20
	for _, f := range families {
		for _, c := range []struct {
			name, id string
			to       netip.Addr
			// whole says every packet but the SYN fits the pod's link
			// as it comes: on the fast path.
			whole    bool
			transfer func(t *testing.T, to netip.Addr)
		}{
			// The host's super-packets are cut by gVisor for a TAP
			// device without offloads, as they were: only the rest
			// takes the fast path.
			{"to a kernel pod", e.a.id, f.a, false, func(t *testing.T, to netip.Addr) {
				if got := tcpTransfer(t, e.outside, e.a.ns, to); got != f.otherNode {
					t.Errorf("the pod saw client %s, want %s", got, f.otherNode)
				}
			}},
			{"to a kernel pod with offloads", vnet.id, vnet.addr(f.a), true, func(t *testing.T, to netip.Addr) {
				if got := tcpTransfer(t, e.outside, vnet.ns, to); got != f.otherNode {
					t.Errorf("the pod saw client %s, want %s", got, f.otherNode)
				}
			}},
			{"to a sandbox", "pod-s", sb.addrs[0], false, func(t *testing.T, to netip.Addr) {
				serveStream(sb.listen(t, to, port))
				var conn net.Conn
				testutil.Do(t, e.outside, func() error {
					var err error
					conn, err = net.DialTimeout("tcp", netip.AddrPortFrom(to, port).String(), ioDeadline)
					return err
				})
				defer conn.Close()
				echoStream(t, conn, size, 10*ioDeadline)
			}},
		} {
			t.Run(f.name+"/"+c.name, func(t *testing.T) {
				to := c.to
				if c.id == "pod-s" && f.a.Is6() {
					to = sb.addrs[1]
				}
				upBefore := e.r.UplinkStats()
				podBefore, err := e.r.LinkStats(c.id)
				if err != nil {
					t.Fatal(err)
				}
				c.transfer(t, to)
				up := e.r.UplinkStats()
				pod, err := e.r.LinkStats(c.id)
				if err != nil {
					t.Fatal(err)
				}
				rx, fast := up.RxPackets-upBefore.RxPackets, up.FastRxPackets-upBefore.FastRxPackets
				toPod := pod.FastTxPackets - podBefore.FastTxPackets
				t.Logf("from the host: %d packets, %d on the fast path; %d to the pod on the fast path (pod tx drops %d, unrouted %d)", rx, fast, toPod, pod.TxDrops-podBefore.TxDrops, e.r.UnroutedDrops())
				if !c.whole {
					return
				}
				// The SYN, and room for what else the host sends the
				// router meanwhile (neighbor discovery).
				if fast == 0 || rx-fast < 1 || rx-fast > 3 {
					t.Errorf("%d of %d packets from the uplink took the fast path; want all but the SYN", fast, rx)
				}
				// The fast path wrote them to this pod's link. (The
				// uplink's count also holds the end of the previous
				// case's connection, to another pod: no equality.)
				if toPod == 0 {
					t.Errorf("the fast path took %d packets from the uplink and wrote none to the pod", fast)
				}
			})
		}
	}
}
