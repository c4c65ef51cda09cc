package router

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

var podStuck4 = netip.MustParseAddr("10.244.1.40")

// TestFastPathWaitsForPodsOnly: a packet for a sandbox whose receive ring is
// full waits (shm.Options.TxWait) when a pod sent it, holding up that pod's
// link only, and never when it came from the uplink, which every pod's
// traffic from the host and beyond shares. The sandbox here takes nothing:
// its client is never attached, so the 32 buffers it posted fill and stay
// full.
func TestFastPathWaitsForPodsOnly(t *testing.T) {
	e := newEnv(t, dualStackConfig(false))
	pair, err := queue.NewPair(queue.Sizes{DataSize: 64 << 10, PipeSize: 16 << 10, BufferSize: 2048})
	if err != nil {
		t.Fatal(err)
	}
	defer pair.Close()
	podMAC := tcpip.LinkAddress([]byte{2, 0, 0, 0, 0, 0x40})
	cli, err := shm.NewClient(shm.Options{Pair: pair, MTU: 1500, LinkAddress: podMAC, PeerFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cli.Close()
		cli.Wait()
	})
	srv, err := shm.NewServer(shm.Options{Pair: pair, MTU: 1500, LinkAddress: gatewayMAC, PeerFD: -1,
		Forwarding: true, TxWait: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.r.AddLink("pod-stuck", srv, Link{Addrs: []netip.Addr{podStuck4}, PodMAC: podMAC, GatewayMAC: gatewayMAC}); err != nil {
		srv.Close()
		srv.Wait()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.r.RemoveLink("pod-stuck"); err != nil {
			t.Errorf("remove link: %v", err)
		}
	})
	st := srv.Stats()
	// settled waits until the link counted want frames sent or dropped
	// in all (a hang guard, not a timing).
	settled := func(want uint64) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for st.TxPackets.Load()+st.TxDrops.Load() < want && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if got := st.TxPackets.Load() + st.TxDrops.Load(); got < want {
			t.Fatalf("the stuck pod's link saw %d frames, want %d", got, want)
		}
	}
	send := func(from ns.NetNS, n int) {
		t.Helper()
		testutil.Do(t, from, func() error {
			c, err := net.Dial("udp", netip.AddrPortFrom(podStuck4, 9).String())
			if err != nil {
				return err
			}
			defer c.Close()
			for range n {
				if _, err := c.Write([]byte("datagram")); err != nil {
					return err
				}
			}
			return nil
		})
	}

	// From the host, through the uplink: the ring fills, the rest drop,
	// nothing waits.
	base := st.TxPackets.Load() + st.TxDrops.Load()
	send(e.host, 64)
	settled(base + 64)
	if st.TxDrops.Load() == 0 {
		t.Fatalf("64 datagrams to a ring of 32 buffers nobody takes: none dropped (%d sent)", st.TxPackets.Load())
	}
	if w := st.TxWaits.Load(); w != 0 {
		t.Errorf("the uplink's packets waited %d times for the stuck pod, want never", w)
	}
	// From a pod: the first waits, then the link is stalled and the
	// others drop at once.
	base = st.TxPackets.Load() + st.TxDrops.Load()
	send(e.a.ns, 10)
	settled(base + 10)
	if w := st.TxWaits.Load(); w != 1 {
		t.Errorf("a pod's packets waited %d times for the stuck pod, want once (then it counts as stalled)", w)
	}
}
