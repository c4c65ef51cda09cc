package shm

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// checkRecorder records what a client's stack is handed, with the
// checksum-validated flag gVisor's NIC would give each packet (from the
// link's RX checksum offload capability as the packet is delivered).
type checkRecorder struct {
	ep        stack.LinkEndpoint
	mu        sync.Mutex
	pkts      [][]byte
	validated []bool
}

func (r *checkRecorder) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	b := pkt.ToView()
	defer b.Release()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pkts = append(r.pkts, bytes.Clone(b.AsSlice()))
	r.validated = append(r.validated, r.ep.Capabilities()&stack.CapabilityRXChecksumOffload != 0)
}

func (*checkRecorder) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

func (r *checkRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pkts)
}

// rxOffloadPair is a forwarding server offering checksum offload and a
// client that takes it (accept) or not, on one queue pair (an L3 link, MTU
// 65000) with a peer socket between them.
func rxOffloadPair(t *testing.T, accept bool) (*Client, *Server, *checkRecorder, <-chan error) {
	t.Helper()
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	a, b := socketPair(t)
	defer closeFD(a)
	defer closeFD(b)
	reason := make(chan error, 1)
	srv, err := NewServer(Options{Pair: p, MTU: 65000, PeerFD: a, Forwarding: true, TxGSO: true, RxGSO: true,
		OnClosed: func(err error) { reason <- err }})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := NewClient(Options{Pair: p, MTU: 65000, BufferSize: queue.DefaultBufferSize, PeerFD: b, TxGSO: true, RxGSO: accept})
	if err != nil {
		t.Fatal(err)
	}
	rec := &checkRecorder{ep: cli}
	attachPair(t, cli, rec, srv, &recorder{})
	return cli, srv, rec, reason
}

// TestRxOffload: once the client took checksum offload, the server writes
// TCP packets with a partial checksum that fit the link whole; the client's
// stack gets each as one packet, as written, marked checksum-validated.
func TestRxOffload(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v6=%t", v6), func(t *testing.T) {
			_, srv, rec, _ := rxOffloadPair(t, true)
			waitFor(t, "the client's acceptance", srv.TakesPartialTCPChecksum)
			const mss = 1448
			sizes := []int{40*mss + 7, 64900, 300}
			var want [][]byte
			var pkts stack.PacketBufferList
			for i, n := range sizes {
				pkt := hostGSOPacket(v6, uint32(1000+i*70000), frametest.RandomBytes(n), mss)
				v := pkt.ToView()
				want = append(want, bytes.Clone(v.AsSlice()))
				v.Release()
				pkts.PushBack(pkt)
			}
			if n, err := srv.WritePackets(pkts); n != len(sizes) || err != nil {
				t.Fatalf("WritePackets = %d, %v", n, err)
			}
			pkts.DecRef()
			waitFor(t, "the packets delivered", func() bool { return rec.count() >= len(sizes) })
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if len(rec.pkts) != len(sizes) {
				t.Fatalf("client got %d packets, want %d whole", len(rec.pkts), len(sizes))
			}
			for i := range sizes {
				if !bytes.Equal(rec.pkts[i], want[i]) {
					t.Errorf("packet %d: %d bytes differ from the %d written", i, len(rec.pkts[i]), len(want[i]))
				}
				if !rec.validated[i] {
					t.Errorf("packet %d not marked checksum-validated", i)
				}
			}
			if cli := rec.ep; cli.Capabilities()&stack.CapabilityRXChecksumOffload != 0 {
				t.Error("the client claims RX checksum offload between frames")
			}
			if st := srv.Stats().Snapshot(); st.TxPackets != uint64(len(sizes)) || st.TxDrops != 0 {
				t.Errorf("server stats %+v", st)
			}
		})
	}
}

// TestRxOffloadBeyondMTU: a super-packet larger than the link's MTU is cut
// into segments with full checksums, none marked, even for a client that
// took the offload: a frame beyond the MTU might need more buffers than the
// client's ring gives one frame.
func TestRxOffloadBeyondMTU(t *testing.T) {
	_, srv, rec, reason := rxOffloadPair(t, true)
	waitFor(t, "the client's acceptance", srv.TakesPartialTCPChecksum)
	const mss = 1448
	payload := frametest.RandomBytes(65400)
	var pkts stack.PacketBufferList
	pkts.PushBack(hostGSOPacket(false, 1, payload, mss))
	srv.WritePackets(pkts)
	pkts.DecRef()
	checkSegments(t, rec, payload)
	select {
	case err := <-reason:
		t.Fatalf("link stopped: %v", err)
	default:
	}
}

// checkSegments waits until rec holds payload in TCP segments with full
// checksums, none marked checksum-validated.
func checkSegments(t *testing.T, rec *checkRecorder, payload []byte) {
	t.Helper()
	var got []byte
	waitFor(t, "the whole payload", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		got = got[:0]
		for i, b := range rec.pkts {
			s, err := frametest.ParseSegment(b, false, false)
			if err != nil {
				t.Fatalf("segment %d: %v", i, err)
			}
			if rec.validated[i] {
				t.Fatalf("segment %d marked checksum-validated", i)
			}
			got = append(got, s.Payload...)
		}
		return len(got) >= len(payload)
	})
	if !bytes.Equal(got, payload) {
		t.Fatal("segments carry other bytes than the super-packet")
	}
}

// TestRxOffloadNotTaken: a client that does not take the offload gets the
// same super-packet with full checksums (whole, as it fits the link), not
// marked.
func TestRxOffloadNotTaken(t *testing.T) {
	_, srv, rec, _ := rxOffloadPair(t, false)
	// The client's silence cannot be waited for: give a write a moment.
	time.Sleep(50 * time.Millisecond)
	if srv.TakesPartialTCPChecksum() {
		t.Fatal("the server flags frames to a client that did not accept")
	}
	const mss = 1448
	payload := frametest.RandomBytes(40*mss + 3)
	var pkts stack.PacketBufferList
	pkts.PushBack(hostGSOPacket(false, 1, payload, mss))
	srv.WritePackets(pkts)
	pkts.DecRef()
	checkSegments(t, rec, payload)
}

// TestRxOffloadPeerBytes: a byte other than the acceptance on the peer
// socket (or a second one) ends the link, as the peer's end of file does.
func TestRxOffloadPeerBytes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write []byte
	}{{"other byte", []byte{'x'}}, {"second acceptance", []byte{rxOffloadAccept}}} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := queue.NewPair(queue.DefaultSizes())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			a, b := socketPair(t)
			defer closeFD(b)
			reason := make(chan error, 1)
			srv, err := NewServer(Options{Pair: p, MTU: 1500, PeerFD: a, Forwarding: true, RxGSO: true,
				OnClosed: func(err error) { reason <- err }})
			closeFD(a)
			if err != nil {
				t.Fatal(err)
			}
			srv.Attach(&recorder{})
			defer func() { srv.Close(); srv.Wait() }()
			if tc.write[0] == rxOffloadAccept {
				if _, err := unix.Write(b, tc.write); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the acceptance", srv.TakesPartialTCPChecksum)
			}
			if _, err := unix.Write(b, tc.write); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-reason:
				if !errors.Is(err, ErrPeerClosed) {
					t.Fatalf("link stopped for %v, want ErrPeerClosed", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the link outlived a stray byte on the peer socket")
			}
		})
	}
}

// TestRxOffloadFlaggedWithoutAcceptance: a client that did not take the
// offload reads the completion's meta word as gVisor's format has it,
// reserved: a flagged frame reaches its stack unmarked, whose own checksum
// check then judges it.
func TestRxOffloadFlaggedWithoutAcceptance(t *testing.T) {
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	reason := make(chan error, 1)
	cli, err := NewClient(Options{Pair: p, MTU: 1500, BufferSize: queue.DefaultBufferSize, PeerFD: -1,
		OnClosed: func(err error) { reason <- err }})
	if err != nil {
		t.Fatal(err)
	}
	rec := &checkRecorder{ep: cli}
	cli.Attach(rec)
	defer func() { cli.Close(); cli.Wait() }()
	// The server's half, as a hostile agent would write it.
	fill, err := queue.NewFiller(p.RX, queue.MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer fill.Close()
	pkt := hostGSOPacket(false, 1, frametest.RandomBytes(500), 1448)
	v := pkt.ToView()
	frame := bytes.Clone(v.AsSlice())
	v.Release()
	pkt.DecRef()
	if ok, err := fill.SendMeta([][]byte{frame}, len(frame), txOffloadTCP|1448); !ok || err != nil {
		t.Fatalf("SendMeta = %v, %v", ok, err)
	}
	if fill.Flush() {
		unix.Write(p.RX.Event, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}
	waitFor(t, "the frame delivered", func() bool { return rec.count() == 1 })
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if !bytes.Equal(rec.pkts[0], frame) || rec.validated[0] {
		t.Fatalf("client delivered %d bytes, validated=%t; want the frame as written, unmarked", len(rec.pkts[0]), rec.validated[0])
	}
	select {
	case err := <-reason:
		t.Fatalf("client stopped: %v", err)
	default:
	}
}
