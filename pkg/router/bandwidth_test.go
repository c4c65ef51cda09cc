package router

import (
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// TestBucket: a bucket starts full, passes what it holds, refuses (and
// counts) what it does not, and refills at the rate; times are given, so
// nothing depends on the clock.
func TestBucket(t *testing.T) {
	// 8 Mbit/s (1 MB/s), burst 8 Mbit (1 MB).
	b := newBucket(8_000_000, 8_000_000)
	t0 := time.Unix(1000, 0)
	for _, step := range []struct {
		at   time.Duration
		size int
		want bool
	}{
		{0, 600_000, true},
		{0, 400_000, true},                      // the burst, spent
		{0, 1, false},                           // nothing left
		{100 * time.Millisecond, 100_000, true}, // 100 ms refill 100 kB
		{100 * time.Millisecond, 1, false},
		{10 * time.Second, 1_000_000, true}, // refilled to the burst, not beyond
		{10 * time.Second, 1, false},
	} {
		if got := b.allow(t0.Add(step.at), step.size); got != step.want {
			t.Errorf("at %v: allow(%d) = %t, want %t", step.at, step.size, got, step.want)
		}
	}
	if got, want := b.dropped(), uint64(3); got != want {
		t.Errorf("dropped() = %d, want %d", got, want)
	}
}

// TestBucketHoldsTheLargestPacket: a burst smaller than the largest IP
// packet (a TCP super-packet) still lets one pass once the bucket is full,
// charged in full: the next waits for the rate.
func TestBucketHoldsTheLargestPacket(t *testing.T) {
	b := newBucket(8_000, 1_000) // 1 kB/s, burst 125 bytes
	t0 := time.Unix(1000, 0)
	if !b.allow(t0, linkspec.MaxMTU) {
		t.Fatal("a full bucket refused a 65535-byte packet")
	}
	if b.allow(t0.Add(time.Second), 1_001) {
		t.Error("1 s after a 65535-byte packet, 1001 bytes passed at 1 kB/s")
	}
	if !b.allow(t0.Add(time.Second), 1_000) {
		t.Error("1 s after a 65535-byte packet, 1000 bytes were refused at 1 kB/s")
	}
}

// TestUnlimitedBucket: rate 0 is no bucket, which allows everything.
func TestUnlimitedBucket(t *testing.T) {
	b := newBucket(0, 0)
	if b != nil {
		t.Fatalf("newBucket(0, 0) = %v, want nil", b)
	}
	if !b.allow(time.Now(), 1<<30) || b.dropped() != 0 {
		t.Error("a nil bucket refused a packet")
	}
	if e := newBandwidthEndpoint(newChanLink().ep, linkspec.Bandwidth{}); e != nil {
		t.Errorf("newBandwidthEndpoint with no limit = %v, want nil", e)
	}
}

// TestBandwidthLimitsLinks: pod B limited at the slowest rate (1 kbit/s,
// whose bucket is the smallest, 65535 bytes) both ways, pod A not. Of 100
// datagrams of 1028 bytes from A to B, on the fast path and through
// gVisor's forwarding, the bucket's worth reaches B and the rest are
// dropped and counted as B's ingress drops; B's datagrams to A likewise
// as B's egress drops; A counts none; ARP is never charged. The refill
// (125 bytes a second) cannot let another datagram through unless the test
// stalls for 8 s.
func TestBandwidthLimitsLinks(t *testing.T) {
	const n, payload = 100, 1000
	const size = header.IPv4MinimumSize + header.UDPMinimumSize + payload
	const fit = minBucketBytes / size // 63
	bw := linkspec.Bandwidth{IngressRate: linkspec.MinBandwidthRate, IngressBurst: 8, EgressRate: linkspec.MinBandwidthRate, EgressBurst: 8}
	for _, noFast := range []bool{false, true} {
		r, err := New(Config{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}, NoFastPath: noFast}, testutil.Logger(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		a, b := newChanLink(), newChanLink()
		if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA}); err != nil {
			t.Fatal(err)
		}
		if err := r.AddLink("b", b.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB, Bandwidth: bw}); err != nil {
			t.Fatal(err)
		}
		send := func(from, to chanLink, mac tcpip.LinkAddress, src, dst netip.Addr) (got int) {
			for range n {
				from.inject(mac, ipPacket(src, dst, header.UDPProtocolNumber, udpDatagram(payload)))
				for to.read() != nil {
					got++
				}
			}
			return got
		}
		got := send(a, b, macA, podA4, podB4)
		stB, _ := r.LinkStats("b")
		if got < fit || got >= n || stB.BandwidthIngressDrops != uint64(n-got) {
			t.Errorf("noFastPath=%t: A to B: %d of %d arrived, %d counted as B's ingress drops; want at least %d arrived and the rest counted",
				noFast, got, n, stB.BandwidthIngressDrops, fit)
		}
		got = send(b, a, macB, podB4, podA4)
		stB, _ = r.LinkStats("b")
		if got < fit || got >= n || stB.BandwidthEgressDrops != uint64(n-got) {
			t.Errorf("noFastPath=%t: B to A: %d of %d arrived, %d counted as B's egress drops; want at least %d arrived and the rest counted",
				noFast, got, n, stB.BandwidthEgressDrops, fit)
		}
		if stA, _ := r.LinkStats("a"); stA.BandwidthIngressDrops != 0 || stA.BandwidthEgressDrops != 0 {
			t.Errorf("noFastPath=%t: unlimited A counts bandwidth drops %d/%d", noFast, stA.BandwidthIngressDrops, stA.BandwidthEgressDrops)
		}
		// B's buckets are empty both ways; ARP still gets through.
		b.injectFrame(macB, header.ARPProtocolNumber, arpPacket(header.ARPRequest, macB, podB4, GatewayV4))
		if frame := b.read(); frame == nil || frame.Type() != header.ARPProtocolNumber {
			t.Errorf("noFastPath=%t: no ARP reply to B with its buckets empty", noFast)
		}
	}
}

// TestAddLinkRefusesBadBandwidth: AddLink checks the limit as the CNI
// plugin does.
func TestAddLinkRefusesBadBandwidth(t *testing.T) {
	r := newUnstartedRouter(t)
	err := r.AddLink("a", newChanLink().ep, Link{Addrs: []netip.Addr{podA4}, PodMAC: macA, Bandwidth: linkspec.Bandwidth{IngressRate: 1_000_000}})
	if err == nil {
		t.Fatal("AddLink took an ingress rate without a burst")
	}
	if len(r.Links()) != 0 {
		t.Errorf("Links() = %v after a refused AddLink", r.Links())
	}
}
