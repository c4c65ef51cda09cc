package shm

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// hostGSOPacket builds a TCP packet as gVisor's TCP does for a link with host
// GSO: headers pushed, the pseudo-header sum in the checksum field, and
// GSOOptions with the MSS.
func hostGSOPacket(v6 bool, seq uint32, payload []byte, mss uint16) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 128, Payload: buffer.MakeWithData(bytes.Clone(payload))})
	tcpLen := header.TCPMinimumSize + len(payload)
	t := header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize))
	t.Encode(&header.TCPFields{SrcPort: 40000, DstPort: 5201, SeqNum: seq, AckNum: 7, DataOffset: header.TCPMinimumSize,
		Flags: header.TCPFlagAck | header.TCPFlagPsh, WindowSize: 1000})
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	src, dst := frametest.Src4, frametest.Dst4
	typ, l3 := stack.GSOTCPv4, header.IPv4MinimumSize
	if v6 {
		src, dst = frametest.Src6, frametest.Dst6
		typ, l3 = stack.GSOTCPv6, header.IPv6MinimumSize
		header.IPv6(pkt.NetworkHeader().Push(l3)).Encode(&header.IPv6Fields{PayloadLength: uint16(tcpLen),
			TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: src, DstAddr: dst})
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	} else {
		ip := header.IPv4(pkt.NetworkHeader().Push(l3))
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(l3 + tcpLen), Flags: header.IPv4FlagDontFragment, TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
		pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	}
	t.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen)))
	pkt.GSOOptions = stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: mss, L3HdrLen: uint16(l3)}
	return pkt
}

// offloadPair is a client and a forwarding server on one queue pair (an L3
// link, MTU 65000), the server's deliveries recorded.
func offloadPair(t *testing.T, clientGSO, serverGSO bool) (*Client, *Server, *recorder, <-chan error) {
	t.Helper()
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	reason := make(chan error, 1)
	srv, err := NewServer(Options{Pair: p, MTU: 65000, PeerFD: -1, Forwarding: true, TxGSO: serverGSO,
		OnClosed: func(err error) { reason <- err }})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := NewClient(Options{Pair: p, MTU: 65000, BufferSize: queue.DefaultBufferSize, PeerFD: -1, TxGSO: clientGSO})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	attachPair(t, cli, &recorder{}, srv, rec)
	return cli, srv, rec, reason
}

// attachPair attaches a client and a server to their dispatchers and
// closes both at the end of t.
func attachPair(t *testing.T, cli *Client, cd stack.NetworkDispatcher, srv *Server, sd stack.NetworkDispatcher) {
	srv.Attach(sd)
	cli.Attach(cd)
	t.Cleanup(func() {
		cli.Close()
		srv.Close()
		cli.Wait()
		srv.Wait()
	})
}

// TestTxOffload sends, as a client's stack with host GSO would, a TCP
// super-packet and a packet of one segment: the first reaches the server's
// stack whole, marked with its MSS and its checksum partial, and segments
// into the very payload with valid checksums; the second arrives marked
// too, its checksum partial, and completes into the segment sent.
func TestTxOffload(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v6=%t", v6), func(t *testing.T) {
			cli, srv, rec, _ := offloadPair(t, true, true)
			if got := cli.SupportedGSO(); got != stack.HostGSOSupported || cli.GSOMaxSize() != 65000 {
				t.Fatalf("client GSO %v, max %d; want host GSO up to the MTU", got, cli.GSOMaxSize())
			}
			if got := srv.SupportedGSO(); got != stack.GSONotSupported {
				t.Fatalf("server GSO %v, want none", got)
			}
			const mss = 1448
			payload := frametest.RandomBytes(40*mss + 7)
			var pkts stack.PacketBufferList
			pkts.PushBack(hostGSOPacket(v6, 1000, payload, mss))
			pkts.PushBack(hostGSOPacket(v6, 1000+uint32(len(payload)), payload[:500], mss))
			pkts.PushBack(hostGSOPacket(v6, 1500+uint32(len(payload)), nil, mss)) // an ACK
			if n, err := cli.WritePackets(pkts); n != 3 || err != nil {
				t.Fatalf("WritePackets = %d, %v", n, err)
			}
			pkts.DecRef()
			waitFor(t, "three packets delivered", func() bool { return rec.count() == 3 })
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if rec.mss[0] != mss {
				t.Fatalf("super-packet marked with MSS %d, want %d", rec.mss[0], mss)
			}
			typ := stack.GSOTCPv4
			if v6 {
				typ = stack.GSOTCPv6
			}
			var got []byte
			ok := endpoint.SoftwareGSO(bytes.Clone(rec.pkts[0]), false, stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: mss}, 1500,
				func(b []byte, _ bool) {
					s, err := frametest.ParseSegment(b, v6, false)
					if err != nil {
						t.Fatalf("segment: %v", err)
					}
					got = append(got, s.Payload...)
				})
			if !ok || !bytes.Equal(got, payload) {
				t.Fatalf("the super-packet segments into %d bytes, not the %d sent", len(got), len(payload))
			}
			// The packet of one segment arrives marked as well, its
			// checksum partial: completed, it is the segment sent.
			if rec.mss[1] != mss {
				t.Fatalf("one-segment packet marked with MSS %d, want %d", rec.mss[1], mss)
			}
			if _, err := frametest.ParseSegment(rec.pkts[1], v6, false); err == nil {
				t.Fatal("one-segment packet arrived with its checksum complete, want it partial")
			}
			var one [][]byte
			ok = endpoint.SoftwareGSO(bytes.Clone(rec.pkts[1]), false, stack.GSO{Type: typ, NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: mss}, 1500,
				func(b []byte, _ bool) { one = append(one, bytes.Clone(b)) })
			if !ok || len(one) != 1 {
				t.Fatalf("the one-segment packet completes into %d segments, want 1", len(one))
			}
			if s, err := frametest.ParseSegment(one[0], v6, false); err != nil || !bytes.Equal(s.Payload, payload[:500]) {
				t.Fatalf("one-segment packet: %v", err)
			}
			// A packet without data goes plain, its checksum complete.
			if rec.mss[2] != 0 {
				t.Fatal("a packet without data arrived marked")
			}
			if s, err := frametest.ParseSegment(rec.pkts[2], v6, false); err != nil || len(s.Payload) != 0 {
				t.Fatalf("packet without data: %v", err)
			}
			if st := srv.Stats().Snapshot(); st.RxPackets != 3 || st.Violations != 0 || st.RxDrops != 0 {
				t.Fatalf("server stats %+v", st)
			}
		})
	}
}

// TestTxOffloadWithoutOffer: a client that was not offered the offload
// sends plain segments, and one that flags a frame to a server that did not
// offer it is cut off.
func TestTxOffloadWithoutOffer(t *testing.T) {
	cli, _, rec, _ := offloadPair(t, false, true)
	if cli.SupportedGSO() != stack.GSONotSupported || cli.GSOMaxSize() != 0 {
		t.Fatal("a client without TxGSO claims GSO")
	}
	var pkts stack.PacketBufferList
	pkts.PushBack(hostGSOPacket(false, 1, frametest.RandomBytes(5000), 1448))
	cli.WritePackets(pkts)
	pkts.DecRef()
	waitFor(t, "segments delivered", func() bool { return rec.count() > 0 })

	cli, srv, _, reason := offloadPair(t, true, false)
	pkts = stack.PacketBufferList{}
	pkts.PushBack(hostGSOPacket(false, 1, frametest.RandomBytes(5000), 1448))
	cli.WritePackets(pkts)
	pkts.DecRef()
	select {
	case err := <-reason:
		if !errors.Is(err, queue.ErrViolation) {
			t.Fatalf("server stopped for %v, want a violation", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a flagged frame on a link without the offload did not cut the client off")
	}
	if v := srv.Stats().Violations.Load(); v != 1 {
		t.Fatalf("%d violations counted, want 1", v)
	}
}

// TestTxOffloadHostileMeta writes frames with chosen meta words through
// the real queue, as a hostile client would: a word that breaks the rules
// cuts the client off; a good word on a frame that is not TCP drops the
// frame and keeps the link.
func TestTxOffloadHostileMeta(t *testing.T) {
	good, _ := frametest.TCPFrame{Flags: header.TCPFlagAck, Seq: 1, Payload: frametest.RandomBytes(3000)}.Build()
	for _, tc := range []struct {
		name      string
		meta      uint32
		frame     []byte
		violation bool
	}{
		{"no MSS", txOffloadTCP, good, true},
		{"no TCP flag", 1448, good, true},
		{"unknown bit", txOffloadTCP | 1<<20 | 1448, good, true},
		{"IPv6 flag on IPv4", txOffloadTCP | txOffloadV6 | 1448, good, false},
		{"not TCP", txOffloadTCP | 1448, bytes.Repeat([]byte{0x45}, 100), false},
		{"good", txOffloadTCP | 1448, good, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := queue.NewPair(queue.DefaultSizes())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			reason := make(chan error, 1)
			srv, err := NewServer(Options{Pair: p, MTU: 65000, PeerFD: -1, Forwarding: true, TxGSO: true,
				OnClosed: func(err error) { reason <- err }})
			if err != nil {
				t.Fatal(err)
			}
			rec := &recorder{}
			srv.Attach(rec)
			defer func() {
				srv.Close()
				srv.Wait()
			}()
			snd, err := queue.NewSender(p.TX, queue.DefaultBufferSize, queue.MapOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer snd.Close()
			if ok, err := snd.SendMeta([][]byte{tc.frame}, len(tc.frame), tc.meta); !ok || err != nil {
				t.Fatalf("SendMeta = %v, %v", ok, err)
			}
			snd.Flush()
			unix.Write(p.TX.Event, []byte{1, 0, 0, 0, 0, 0, 0, 0})
			if tc.violation {
				select {
				case err := <-reason:
					if !errors.Is(err, queue.ErrViolation) {
						t.Fatalf("stopped for %v, want a violation", err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("not cut off")
				}
				return
			}
			waitFor(t, "the frame handled", func() bool {
				st := srv.Stats().Snapshot()
				return st.RxPackets+st.RxDrops == 1
			})
			st := srv.Stats().Snapshot()
			if tc.name == "good" {
				if st.RxPackets != 1 || rec.count() != 1 || rec.mss[0] != 1448 {
					t.Fatalf("good frame: stats %+v, %d delivered", st, rec.count())
				}
			} else if st.RxDrops != 1 || rec.count() != 0 {
				t.Fatalf("a frame that is not TCP of its flag: stats %+v, %d delivered; want dropped", st, rec.count())
			}
			select {
			case err := <-reason:
				t.Fatalf("the link stopped: %v", err)
			default:
			}
		})
	}
}
