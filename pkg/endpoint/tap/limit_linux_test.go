package tap

import (
	"encoding/binary"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// TestRxLimitBoundsKernelPod floods a TAP endpoint with a receive limit
// from the pod's side of the device (raw frames on a packet socket) and
// checks the same bound as TestRxLimitBoundsSandbox: the endpoint read no
// more than the token bucket allows, paused for it, and the kernel dropped
// the rest at the device's queue.
func TestRxLimitBoundsKernelPod(t *testing.T) {
	testutil.RequireRoot(t)
	const pps = 2000
	pod := newKernelPod(t, "eth0", tuntap.Options{VnetHdr: true, Offload: true})
	ep, err := New(Options{FD: rawFD(t, pod.file), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true,
		RxLimit: endpoint.RxLimit{PacketsPerSecond: pps}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ep.Close()
		ep.Wait()
	}()
	fd := capture(t, pod)
	frame := make([]byte, header.EthernetMinimumSize+100)
	copy(frame, agentMAC)
	copy(frame[6:], "\x02\x00\x00\x00\x99\x01")
	binary.BigEndian.PutUint16(frame[12:], uint16(header.IPv4ProtocolNumber))
	frame[header.EthernetMinimumSize] = 0x45
	var got counter
	start := time.Now()
	ep.Attach(&got)
	sent := 0
	err = pod.netns.Do(func(ns.NetNS) error {
		for time.Since(start) < 500*time.Millisecond {
			if _, err := unix.Write(fd, frame); err == nil {
				sent++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	delivered := got.n.Load()
	elapsed := time.Since(start)
	// A full bucket (the 20 ms burst: 40 frames), a batch of frames read
	// but not charged yet, and a batch charged after its delivery.
	bound := int64(pps*elapsed.Seconds()) + int64(pps*endpoint.DefaultRxBurst.Seconds()) + 2*tapChargeEvery
	throttled := ep.Stats().RxThrottled.Load()
	t.Logf("pod sent %d frames, endpoint delivered %d in %v (bound %d), paused %d times",
		sent, delivered, elapsed.Round(time.Millisecond), bound, throttled)
	if delivered == 0 {
		t.Fatal("nothing delivered")
	}
	if delivered > bound+bound/100+2 { // 1% and 2 frames for rounding
		t.Errorf("endpoint delivered %d frames in %v, above the limit's %d", delivered, elapsed, bound)
	}
	if throttled == 0 {
		t.Error("the endpoint never paused for its limit")
	}
	if int64(sent) <= delivered {
		t.Errorf("pod sent %d frames and all were read: the flood did not outrun the limit", sent)
	}
}

// BenchmarkRxLimiterTake is the cost of one charge to a receive limit that
// never binds: what the TAP reader saves by charging every tapChargeEvery
// frames.
func BenchmarkRxLimiterTake(b *testing.B) {
	var st endpoint.Stats
	l := endpoint.NewRxLimiter(endpoint.RxLimit{PacketsPerSecond: 1e12}, 1, readBufSize, &st)
	for b.Loop() {
		l.Take(1, 1500, nil)
	}
}

// counter counts the packets delivered to it.
type counter struct{ n atomic.Int64 }

func (c *counter) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) { c.n.Add(1) }
func (c *counter) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}
