package shm

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"github.com/shm-cni/shm-cni/pkg/queue"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// stream returns the frames a sender cuts payload into at mss: full
// checksums, ACK on every segment and PSH on the last, IPv4 IDs counting up
// from 9, as softwareGSO makes them.
func stream(v6, ethernet bool, tcpOpts int, payload []byte, mss int) [][]byte {
	var frames [][]byte
	for off := 0; off < len(payload); off += mss {
		end := min(off+mss, len(payload))
		flags := header.TCPFlagAck
		if end == len(payload) {
			flags |= header.TCPFlagPsh
		}
		f, _ := frametest.TCPFrame{V6: v6, Ethernet: ethernet, TCPOpts: tcpOpts, Flags: flags, Seq: 1000 + uint32(off),
			ID: 9 + uint16(len(frames)), Payload: payload[off:end], FullCsum: true}.Build()
		frames = append(frames, f)
	}
	return frames
}

func views(frames [][]byte) []*buffer.View {
	vs := make([]*buffer.View, len(frames))
	for i, f := range frames {
		vs[i] = buffer.NewViewWithData(bytes.Clone(f))
	}
	return vs
}

// delivery is one call of coalesceRuns' deliver: the views it was given, in
// order.
type delivery []*buffer.View

// runCoalesce runs coalesceRuns on vs and returns what it delivered, and the
// joined frame of every run (nil for a single frame).
func runCoalesce(vs []*buffer.View, ethernet bool) ([]delivery, [][]byte, []uint16) {
	var got []delivery
	var joined [][]byte
	var mss []uint16
	coalesceRuns(vs, ethernet, new(runScratch), func(run []segment, single *buffer.View) {
		if single != nil {
			got = append(got, delivery{single})
			joined = append(joined, nil)
			mss = append(mss, 0)
			return
		}
		d := make(delivery, len(run))
		for i := range run {
			d[i] = run[i].v
		}
		got = append(got, d)
		out, m := joinRun(run)
		var b []byte
		for _, v := range out {
			b = append(b, v.AsSlice()...)
		}
		joined = append(joined, b)
		mss = append(mss, m)
	})
	return got, joined, mss
}

// TestCoalesceRoundTrip checks that a stream of segments is joined into one
// super-packet with a partial checksum, and that segmenting it again at its
// MSS gives back the very frames that went in.
func TestCoalesceRoundTrip(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, ethernet := range []bool{false, true} {
			for _, opts := range []int{0, 12} {
				t.Run(fmt.Sprintf("v6=%t/ethernet=%t/opts=%d", v6, ethernet, opts), func(t *testing.T) {
					const mss = 1448
					payload := frametest.RandomBytes(20*mss + 333)
					frames := stream(v6, ethernet, opts, payload, mss)
					got, joined, gotMSS := runCoalesce(views(frames), ethernet)
					if len(got) != 1 || len(got[0]) != len(frames) {
						t.Fatalf("delivered %d times (first with %d frames), want once with %d", len(got), len(got[0]), len(frames))
					}
					if gotMSS[0] != mss {
						t.Fatalf("MSS %d, want %d", gotMSS[0], mss)
					}
					super := joined[0]
					f, err := endpoint.ParseTCPFrame(super, ethernet, v6)
					if err != nil {
						t.Fatalf("super-packet does not parse: %v", err)
					}
					if n := len(super) - f.HeaderLength(); n != len(payload) || !bytes.Equal(super[f.HeaderLength():], payload) {
						t.Fatalf("super-packet carries %d payload bytes, not the stream's %d", n, len(payload))
					}
					if !v6 && !header.IPv4(super[f.L2:]).IsChecksumValid() {
						t.Fatal("IPv4 header checksum invalid")
					}
					tcp := header.TCP(super[f.L2+f.L3:])
					if want := endpoint.PseudoHeaderSum(&f, len(super)-f.L2-f.L3); tcp.Checksum() != want {
						t.Fatalf("TCP checksum field %#x, want the pseudo-header sum %#x", tcp.Checksum(), want)
					}
					if tcp.Flags() != header.TCPFlagAck|header.TCPFlagPsh {
						t.Fatalf("flags %v, want ACK PSH", tcp.Flags())
					}
					typ := stack.GSOTCPv4
					if v6 {
						typ = stack.GSOTCPv6
					}
					gso := stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: gotMSS[0]}
					var segs [][]byte
					if !endpoint.SoftwareGSO(bytes.Clone(super), ethernet, gso, uint32(f.L3+f.L4+mss), func(b []byte, _ bool) {
						segs = append(segs, bytes.Clone(b))
					}) {
						t.Fatal("softwareGSO refused the super-packet")
					}
					if len(segs) != len(frames) {
						t.Fatalf("segmented into %d frames, want %d", len(segs), len(frames))
					}
					for i := range segs {
						if !bytes.Equal(segs[i], frames[i]) {
							t.Fatalf("segment %d differs from the frame that went in", i)
						}
					}
				})
			}
		}
	}
}

// TestCoalesceRuns checks which frames join and that every frame is
// delivered once, in order.
func TestCoalesceRuns(t *testing.T) {
	const mss = 1000
	base := func() [][]byte { return stream(false, true, 12, frametest.RandomBytes(6*mss), mss) }
	edit := func(f []byte, fn func(ip header.IPv4, tcp header.TCP)) []byte {
		ip := header.IPv4(f[header.EthernetMinimumSize:])
		fn(ip, header.TCP(ip[ip.HeaderLength():]))
		return f
	}
	// fixTCP recomputes a frame's TCP checksum after an edit.
	fixTCP := func(ip header.IPv4, tcp header.TCP) {
		tcp.SetChecksum(0)
		xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(ip)-int(ip.HeaderLength())))
		tcp.SetChecksum(^checksum.Checksum(tcp, xsum))
	}
	tests := []struct {
		name   string
		frames func() [][]byte
		want   []int // frames per delivery
	}{
		{"a stream", base, []int{6}},
		{"bad checksum delivered alone", func() [][]byte {
			fs := base()
			edit(fs[2], func(_ header.IPv4, tcp header.TCP) { tcp.SetChecksum(tcp.Checksum() + 1) })
			return fs
		}, []int{2, 1, 3}},
		{"bad first checksum delivered alone", func() [][]byte {
			fs := base()
			edit(fs[0], func(_ header.IPv4, tcp header.TCP) { tcp.SetChecksum(tcp.Checksum() + 1) })
			return fs
		}, []int{1, 5}},
		{"sequence gap", func() [][]byte {
			fs := base()
			return append(fs[:2:2], fs[3:]...)
		}, []int{2, 3}},
		{"other port", func() [][]byte {
			fs := base()
			edit(fs[3], func(ip header.IPv4, tcp header.TCP) { tcp.SetSourcePort(40001); fixTCP(ip, tcp) })
			return fs
		}, []int{3, 1, 2}},
		{"PSH ends a run", func() [][]byte {
			fs := base()
			edit(fs[1], func(ip header.IPv4, tcp header.TCP) {
				tcp.SetFlags(uint8(header.TCPFlagAck | header.TCPFlagPsh))
				fixTCP(ip, tcp)
			})
			return fs
		}, []int{2, 4}},
		{"FIN alone", func() [][]byte {
			fs := base()
			edit(fs[5], func(ip header.IPv4, tcp header.TCP) {
				tcp.SetFlags(uint8(header.TCPFlagAck | header.TCPFlagFin))
				fixTCP(ip, tcp)
			})
			return fs
		}, []int{5, 1}},
		{"other ACK number", func() [][]byte {
			fs := base()
			edit(fs[4], func(ip header.IPv4, tcp header.TCP) { tcp.SetAckNumber(8); fixTCP(ip, tcp) })
			return fs
		}, []int{4, 1, 1}},
		{"other options", func() [][]byte {
			fs := base()
			edit(fs[1], func(ip header.IPv4, tcp header.TCP) { tcp[header.TCPMinimumSize] = 0; fixTCP(ip, tcp) })
			return fs
		}, []int{1, 1, 4}},
		{"fragmentable IPv4 alone", func() [][]byte {
			fs := base()
			edit(fs[0], func(ip header.IPv4, _ header.TCP) {
				ip.SetFlagsFragmentOffset(0, 0)
				ip.SetChecksum(0)
				ip.SetChecksum(^ip.CalculateChecksum())
			})
			return fs
		}, []int{1, 5}},
		{"other TTL", func() [][]byte {
			fs := base()
			edit(fs[2], func(ip header.IPv4, _ header.TCP) {
				ip.SetTTL(3)
				ip.SetChecksum(0)
				ip.SetChecksum(^ip.CalculateChecksum())
			})
			return fs
		}, []int{2, 1, 3}},
		{"short segment ends a run", func() [][]byte {
			return slices.Concat(stream(false, true, 12, frametest.RandomBytes(2*mss+10), mss), stream(false, true, 12, frametest.RandomBytes(2*mss), mss))
		}, []int{3, 2}},
		{"pure ACKs alone", func() [][]byte {
			a, _ := frametest.TCPFrame{Ethernet: true, Flags: header.TCPFlagAck, Seq: 5, FullCsum: true}.Build()
			return [][]byte{a, bytes.Clone(a)}
		}, []int{1, 1}},
		{"padded frame alone", func() [][]byte {
			fs := base()
			p, _ := frametest.TCPFrame{Ethernet: true, TCPOpts: 12, Flags: header.TCPFlagAck, Seq: 1000 + 6*mss, Payload: frametest.RandomBytes(10), Pad: 6, FullCsum: true}.Build()
			return append(fs, p)
		}, []int{6, 1}},
		{"within an IP packet", func() [][]byte {
			return stream(false, true, 0, frametest.RandomBytes(3*30000), 30000)
		}, []int{2, 1}},
		{"garbage alone", func() [][]byte {
			fs := base()
			return append(fs[:3:3], append([][]byte{{0x45, 1, 2}}, fs[3:]...)...)
		}, []int{3, 1, 3}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			frames := tc.frames()
			vs := views(frames)
			in := slices.Clone(vs)
			got, joined, _ := runCoalesce(vs, true)
			var sizes []int
			var order []*buffer.View
			for i, d := range got {
				sizes = append(sizes, len(d))
				order = append(order, d...)
				if len(d) > 1 && joined[i] == nil {
					t.Errorf("delivery %d: a run without a super-packet", i)
				}
			}
			if !slices.Equal(sizes, tc.want) {
				t.Errorf("deliveries of %v frames, want %v", sizes, tc.want)
			}
			if !slices.Equal(order, in) {
				t.Error("frames delivered out of order, twice or not at all")
			}
		})
	}
}

// FuzzCoalesce feeds coalesceRuns frames a sandbox could write: it must
// deliver every frame once and in order, and every super-packet must carry
// exactly its run's payloads.
func FuzzCoalesce(f *testing.F) {
	for _, fr := range stream(false, true, 12, frametest.RandomBytes(3000), 1000) {
		f.Add(fr, true)
	}
	seed := slices.Concat(stream(true, false, 0, frametest.RandomBytes(2500), 1000)...)
	f.Add(seed, false)
	f.Fuzz(func(t *testing.T, data []byte, ethernet bool) {
		// Cut data into frames at IP boundaries where it parses, so that
		// the seeds' streams stay streams; the rest as it comes.
		var frames [][]byte
		for len(data) > 0 {
			n := len(data)
			if l2 := header.EthernetMinimumSize; ethernet && n > l2+header.IPv4MinimumSize {
				if p, err := endpoint.ParseTCPFrame(data, true, header.IPVersion(data[l2:]) == header.IPv6Version); err == nil {
					n = len(p.Frame)
				}
			} else if !ethernet && n > header.IPv4MinimumSize {
				if p, err := endpoint.ParseTCPFrame(data, false, header.IPVersion(data) == header.IPv6Version); err == nil {
					n = len(p.Frame)
				}
			}
			frames = append(frames, data[:n])
			data = data[n:]
			if len(frames) == rxBatch {
				break
			}
		}
		vs := views(frames)
		in := slices.Clone(vs)
		var order []*buffer.View
		coalesceRuns(vs, ethernet, new(runScratch), func(run []segment, single *buffer.View) {
			if single != nil {
				order = append(order, single)
				return
			}
			var want []byte
			for i := range run {
				if !run[i].checksumOK() {
					t.Fatalf("segment %d of a run has a bad checksum", i)
				}
				order = append(order, run[i].v)
				want = append(want, run[i].v.AsSlice()[run[i].f.HeaderLength():]...)
			}
			out, _ := joinRun(run)
			var b []byte
			for _, v := range out {
				b = append(b, v.AsSlice()...)
			}
			p, err := endpoint.ParseTCPFrame(b, ethernet, run[0].f.V6)
			if err != nil {
				t.Fatalf("super-packet does not parse: %v", err)
			}
			if len(p.Frame) != len(b) || !bytes.Equal(b[p.HeaderLength():], want) {
				t.Fatal("super-packet does not carry its run's payloads")
			}
		})
		if !slices.Equal(order, in) {
			t.Fatal("frames delivered out of order, twice or not at all")
		}
	})
}

// recorder is a dispatcher that keeps what it is given.
type recorder struct {
	mu   sync.Mutex
	pkts [][]byte
	mss  []uint16
}

func (r *recorder) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	mss, _ := endpoint.ForwardedGSO(pkt)
	b := pkt.ToView()
	defer b.Release()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pkts = append(r.pkts, bytes.Clone(b.AsSlice()))
	r.mss = append(r.mss, mss)
}

func (*recorder) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pkts)
}

// TestCoalesceOverQueue sends a stream of segments through a real queue
// pair: a Forwarding server delivers them to its stack as one marked
// super-packet and counts every frame; a server that does not forward
// delivers them as they came.
func TestCoalesceOverQueue(t *testing.T) {
	const mss = 1448
	payload := frametest.RandomBytes(30*mss + 100)
	frames := stream(false, false, 12, payload, mss)
	for _, forwarding := range []bool{true, false} {
		t.Run(fmt.Sprintf("forwarding=%t", forwarding), func(t *testing.T) {
			p, err := queue.NewPair(queue.DefaultSizes())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			srv, err := NewServer(Options{Pair: p, MTU: 65000, PeerFD: -1, Forwarding: forwarding})
			if err != nil {
				t.Fatal(err)
			}
			cli, err := NewClient(Options{Pair: p, MTU: 65000, BufferSize: queue.DefaultBufferSize, PeerFD: -1})
			if err != nil {
				t.Fatal(err)
			}
			rec := &recorder{}
			srv.Attach(rec)
			cli.Attach(&recorder{})
			defer func() {
				cli.Close()
				srv.Close()
				cli.Wait()
				srv.Wait()
			}()
			var pkts stack.PacketBufferList
			for _, f := range frames {
				pkts.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(bytes.Clone(f))}))
			}
			n, terr := cli.WritePackets(pkts)
			pkts.DecRef()
			if terr != nil || n != len(frames) {
				t.Fatalf("client wrote %d of %d frames: %v", n, len(frames), terr)
			}
			want := 1
			if !forwarding {
				want = len(frames)
			}
			waitFor(t, "the frames delivered", func() bool {
				return srv.Stats().RxPackets.Load() == uint64(len(frames)) && rec.count() >= want
			})
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if len(rec.pkts) != want {
				t.Fatalf("%d packets delivered, want %d", len(rec.pkts), want)
			}
			if !forwarding {
				for i := range frames {
					if !bytes.Equal(rec.pkts[i], frames[i]) || rec.mss[i] != 0 {
						t.Fatalf("frame %d changed or marked", i)
					}
				}
				return
			}
			if rec.mss[0] != mss {
				t.Fatalf("super-packet marked with MSS %d, want %d", rec.mss[0], mss)
			}
			f, err := endpoint.ParseTCPFrame(rec.pkts[0], false, false)
			if err != nil || !bytes.Equal(rec.pkts[0][f.HeaderLength():], payload) {
				t.Fatalf("super-packet does not carry the stream (%v)", err)
			}
		})
	}
}

// TestCoalesceRunsAllocatesNothing: a receive batch with a run and frames
// delivered alone costs no allocation (the run is kept in the receive
// loop's scratch), and the scratch holds no view once the batch is done.
func TestCoalesceRunsAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	payload := bytes.Repeat([]byte{7}, 8*1460)
	frames := stream(false, true, 12, payload, 1460)
	arp := make([]byte, header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(arp).Encode(&header.EthernetFields{Type: header.ARPProtocolNumber})
	frames = append(frames, arp)
	vs := views(frames)
	scratch := new(runScratch)
	runs, singles := 0, 0
	deliver := func(run []segment, single *buffer.View) {
		if single != nil {
			singles++
		} else {
			runs++
		}
	}
	if allocs := testing.AllocsPerRun(100, func() { coalesceRuns(vs, true, scratch, deliver) }); allocs != 0 {
		t.Errorf("coalesceRuns allocated %v times a batch, want 0", allocs)
	}
	if runs == 0 || singles == 0 {
		t.Fatalf("%d runs and %d frames alone: the batch did not exercise both", runs, singles)
	}
	for i := range scratch {
		if scratch[i].v != nil {
			t.Fatalf("scratch[%d] still holds a view after the batch", i)
		}
	}
}
