package router

import (
	"context"
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// shaperPacket returns a packet of n bytes whose first 4 carry id.
func shaperPacket(id, n int) *stack.PacketBuffer {
	b := make([]byte, n)
	binary.BigEndian.PutUint32(b, uint32(id))
	return stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
}

// recorder collects what a shaper sends, by packet id.
type recorder struct {
	mu  sync.Mutex
	ids []int
}

func (r *recorder) send(hs []held) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, h := range hs {
		b := h.pkt.ToView().AsSlice()
		r.ids = append(r.ids, int(binary.BigEndian.Uint32(b)))
	}
}

func (r *recorder) got() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.ids)
}

// TestShaperBucketAndQueue: a shaper passes what its bucket holds at once,
// holds what follows in its queue up to the queue's limit and drops the
// rest, counting both. At 1 kB/s nothing held is sent during the test.
func TestShaperBucketAndQueue(t *testing.T) {
	var rec recorder
	s := newShaper(8_000, 8, rec.send) // 1 kB/s; the burst is raised to 65535 bytes
	defer s.close()
	if got, want := s.limit, minQueueBytes; got != want {
		t.Fatalf("queue limit %d, want %d", got, want)
	}
	now := time.Now()
	admit := func(id, size int) bool {
		pkt := shaperPacket(id, size)
		defer pkt.DecRef()
		return s.admit(now, header.IPv4ProtocolNumber, pkt, size)
	}
	if !admit(0, linkspec.MaxMTU) {
		t.Fatal("a full bucket held or dropped a 65535-byte packet (a burst below it is raised to it)")
	}
	// The bucket is empty: 131 of 1000 bytes fit the 131070-byte queue.
	for id := 1; id <= 132; id++ {
		if admit(id, 1000) {
			t.Fatalf("packet %d passed an empty bucket", id)
		}
	}
	if d, x := s.counts(); d != 131 || x != 1 {
		t.Errorf("delayed %d, dropped %d; want 131 held and 1 dropped", d, x)
	}
}

// TestShaperSendsInOrder: what a shaper holds it sends, all of it and in
// order, once its bucket covers it; what comes while it holds packets
// waits behind them. The test waits for the sends; it measures no time.
func TestShaperSendsInOrder(t *testing.T) {
	var rec recorder
	s := newShaper(8_000_000, 8, rec.send) // 1 MB/s, bucket 65535 bytes, queue 131070
	defer s.close()
	const n, size = 180, 1000 // 65 pass, 115 held
	var passed []int
	for id := range n {
		pkt := shaperPacket(id, size)
		if s.admit(time.Now(), header.IPv4ProtocolNumber, pkt, size) {
			passed = append(passed, id)
		}
		pkt.DecRef()
	}
	delayed, dropped := s.counts()
	if dropped != 0 || delayed == 0 || len(passed)+int(delayed) != n {
		t.Fatalf("%d passed, %d held, %d dropped of %d; want none dropped and some held", len(passed), delayed, dropped, n)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(rec.got()) < int(delayed) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	all := append(passed, rec.got()...)
	if !slices.Equal(all, slices.Sorted(slices.Values(all))) || len(all) != n {
		t.Errorf("passed %v then sent %v: want every packet once, in order", passed, rec.got())
	}
}

// TestUnlimited: rate 0 is no shaper, which passes everything; no limit is
// no wrapper.
func TestUnlimited(t *testing.T) {
	s := newShaper(0, 0, nil)
	if s != nil {
		t.Fatalf("newShaper(0, 0) = %v, want nil", s)
	}
	if !s.admit(time.Now(), header.IPv4ProtocolNumber, nil, 1<<30) {
		t.Error("a nil shaper held a packet")
	}
	if e := newBandwidthEndpoint(newChanLink().ep, linkspec.Bandwidth{}); e != nil {
		t.Errorf("newBandwidthEndpoint with no limit = %v, want nil", e)
	}
}

// TestQueueLimit: 25 ms at the rate plus the burst, within its bounds.
func TestQueueLimit(t *testing.T) {
	for _, tc := range []struct {
		rate, burst uint64
		want        int
	}{
		{1_000, 8, minQueueBytes},
		{100_000_000, 8, 312_501},
		{50_000_000, 1_000_000, 156_250 + 125_000},
		{1_000_000, 1<<32 - 1, maxQueueBytes}, // containerd's burst
		{10_000_000_000, 8, maxQueueBytes},
	} {
		if got := queueLimit(tc.rate, tc.burst); got != tc.want {
			t.Errorf("queueLimit(%d, %d) = %d, want %d", tc.rate, tc.burst, got, tc.want)
		}
	}
}

// bigChanLink is a chanLink whose channel holds 1024 frames.
func bigChanLink() chanLink {
	ch := channel.New(1024, 1500, gwMAC)
	return chanLink{ch: ch, ep: ethernet.New(ch)}
}

// limitedPair returns a router (the fast path unless noFast) with pod
// links a, unlimited, and b, limited to bw.
func limitedPair(t *testing.T, noFast bool, bw linkspec.Bandwidth) (*Router, chanLink, chanLink) {
	t.Helper()
	r, err := New(Config{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}, NoFastPath: noFast}, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	a, b := bigChanLink(), bigChanLink()
	if err := r.AddLink("a", a.ep, Link{Addrs: []netip.Addr{podA4, podA6}, PodMAC: macA}); err != nil {
		t.Fatal(err)
	}
	if err := r.AddLink("b", b.ep, Link{Addrs: []netip.Addr{podB4, podB6}, PodMAC: macB, Bandwidth: bw}); err != nil {
		t.Fatal(err)
	}
	return r, a, b
}

// TestBandwidthHoldsAndDrops: pod B limited at the slowest rate (1 kbit/s:
// a bucket of 65535 bytes, a queue of 131070) both ways, pod A not. Of 300
// datagrams of 1028 bytes each way, on the fast path and through gVisor's
// forwarding, a bucket's worth arrives at once, a queue's worth is held
// (not sent during the test: it refills 125 bytes a second) and the rest is
// dropped, counted for B and its direction; A counts nothing; ARP is never
// held.
func TestBandwidthHoldsAndDrops(t *testing.T) {
	const n, payload = 300, 1000
	const size = header.IPv4MinimumSize + header.UDPMinimumSize + payload
	const fit = minBucketBytes / size // 63
	bw := linkspec.Bandwidth{IngressRate: linkspec.MinBandwidthRate, IngressBurst: 8, EgressRate: linkspec.MinBandwidthRate, EgressBurst: 8}
	for _, noFast := range []bool{false, true} {
		r, a, b := limitedPair(t, noFast, bw)
		send := func(from, to chanLink, mac tcpip.LinkAddress, src, dst netip.Addr) (got int) {
			for range n {
				from.inject(mac, ipPacket(src, dst, header.UDPProtocolNumber, udpDatagram(payload)))
				for to.read() != nil {
					got++
				}
			}
			return got
		}
		check := func(what string, got int, delayed, dropped uint64) {
			t.Helper()
			if got < fit || delayed == 0 || dropped == 0 || got+int(delayed)+int(dropped) < n {
				t.Errorf("noFastPath=%t: %s: %d of %d arrived at once, %d held, %d dropped; want at least %d at once, some held, some dropped",
					noFast, what, got, n, delayed, dropped, fit)
			}
		}
		got := send(a, b, macA, podA4, podB4)
		st, _ := r.LinkStats("b")
		check("A to B (B's ingress)", got, st.BandwidthIngressDelayed, st.BandwidthIngressDrops)
		got = send(b, a, macB, podB4, podA4)
		st, _ = r.LinkStats("b")
		check("B to A (B's egress)", got, st.BandwidthEgressDelayed, st.BandwidthEgressDrops)
		if st, _ := r.LinkStats("a"); st.BandwidthIngressDelayed+st.BandwidthIngressDrops+st.BandwidthEgressDelayed+st.BandwidthEgressDrops != 0 {
			t.Errorf("noFastPath=%t: unlimited A counts bandwidth: %+v", noFast, st)
		}
		b.injectFrame(macB, header.ARPProtocolNumber, arpPacket(header.ARPRequest, macB, podB4, GatewayV4))
		if frame := b.read(); frame == nil || frame.Type() != header.ARPProtocolNumber {
			t.Errorf("noFastPath=%t: no ARP reply to B with its limits spent", noFast)
		}
		// Removing B stops its shapers' goroutines and releases what
		// they held.
		r.mu.Lock()
		lim := r.links["b"].bw
		r.mu.Unlock()
		if err := r.RemoveLink("b"); err != nil {
			t.Fatal(err)
		}
		for _, s := range []*shaper{lim.ingress, lim.egress} {
			select {
			case <-s.done:
			default:
				t.Errorf("noFastPath=%t: a shaper's goroutine runs on after RemoveLink", noFast)
			}
			s.mu.Lock()
			if len(s.queue) != 0 || s.queued != 0 {
				t.Errorf("noFastPath=%t: a shaper holds %d packets after RemoveLink", noFast, len(s.queue))
			}
			s.mu.Unlock()
		}
	}
}

// TestBandwidthDeliversHeld: what B's limit holds reaches its destination,
// all of it and in order, both ways, on either forwarding path. The test
// waits for the packets; it measures no time.
func TestBandwidthDeliversHeld(t *testing.T) {
	// 100 kB/s, a bucket of 65535 bytes and a queue of 131070: 63
	// datagrams pass at once, the other 87 (89 kB) are held unless
	// injecting each takes longer than it takes at the rate (10 ms; the
	// slow path under -race on a loaded machine takes about 1 ms). They
	// arrive within about a second.
	const n, payload = 150, 1000
	bw := linkspec.Bandwidth{IngressRate: 800_000, IngressBurst: 8, EgressRate: 800_000, EgressBurst: 8}
	for _, noFast := range []bool{false, true} {
		r, a, b := limitedPair(t, noFast, bw)
		send := func(from, to chanLink, mac tcpip.LinkAddress, src, dst netip.Addr) []int {
			for id := range n {
				d := udpDatagram(payload)
				binary.BigEndian.PutUint32(d[header.UDPMinimumSize:], uint32(id))
				from.inject(mac, ipPacket(src, dst, header.UDPProtocolNumber, d))
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var ids []int
			for len(ids) < n {
				pkt := to.ch.ReadContext(ctx)
				if pkt == nil {
					break
				}
				_, _, _, udp := ipFields(pkt.ToView().AsSlice()[header.EthernetMinimumSize:])
				ids = append(ids, int(binary.BigEndian.Uint32(udp[header.UDPMinimumSize:])))
				pkt.DecRef()
			}
			return ids
		}
		for _, tc := range []struct {
			what      string
			from, to  chanLink
			mac       tcpip.LinkAddress
			src, dst  netip.Addr
			delayedOf func(LinkStats) uint64
		}{
			{"A to B (B's ingress)", a, b, macA, podA4, podB4, func(s LinkStats) uint64 { return s.BandwidthIngressDelayed }},
			{"B to A (B's egress)", b, a, macB, podB6, podA6, func(s LinkStats) uint64 { return s.BandwidthEgressDelayed }},
		} {
			ids := send(tc.from, tc.to, tc.mac, tc.src, tc.dst)
			st, _ := r.LinkStats("b")
			if len(ids) != n || !slices.IsSorted(ids) || tc.delayedOf(st) == 0 {
				t.Errorf("noFastPath=%t: %s: %d of %d arrived (in order: %t), %d held; want all in order, some held",
					noFast, tc.what, len(ids), n, slices.IsSorted(ids), tc.delayedOf(st))
			}
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
