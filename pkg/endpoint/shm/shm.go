package shm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/hoptrace"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// rxBatch is the number of frames copied out of a ring before its slots are
// handed back and the frames delivered to the stack.
const rxBatch = 64

// maxMTU is the largest MTU a link can have: the largest IP packet.
const maxMTU = linkspec.MaxMTU

// ErrPeerClosed is the reason given to OnClosed when the peer closed its end
// of the peer socket (normally: the peer process died).
var ErrPeerClosed = errors.New("peer closed")

// Options configure a shared-memory link endpoint, server or client.
type Options struct {
	// Pair is the queue pair's file descriptors. The endpoint maps the
	// regions and duplicates the eventfds: the caller keeps the
	// descriptors and may close them once the constructor returned.
	Pair queue.Pair
	// MTU is the link's MTU: the largest IP packet it carries.
	MTU uint32
	// BufferSize is the size of one data buffer (client only: the server
	// uses the buffers the client gives it).
	BufferSize uint32
	// LinkAddress is this side's MAC. Empty means an L3 link without
	// Ethernet headers; both sides must agree.
	LinkAddress tcpip.LinkAddress
	// PeerFD, if >= 0, is a socket or pipe connected to the peer that
	// carries no data: end of file (or any byte) means the peer is gone.
	// The endpoint duplicates it.
	PeerFD int
	// OnClosed, if set, is called once when the endpoint stopped for a
	// reason other than Close: the peer closed PeerFD (ErrPeerClosed) or
	// broke the protocol (an error wrapping queue.ErrViolation). It runs
	// after the endpoint released its resources, on the endpoint's own
	// goroutine: it may call Close or remove the NIC but must not call
	// Wait.
	OnClosed func(error)
	// Forwarding says the endpoint is a link of a stack that only forwards
	// (the node's router, server side): it then claims TX checksum
	// offload, so that the stack does not recompute the transport checksum
	// of every packet it forwards to the sandbox (they arrive with valid
	// ones: the router rewrites no address, and TCP super-packets with
	// partial checksums are completed when segmented, see
	// pkg/endpoint/gso.go). Not for a stack with transport endpoints of
	// its own.
	Forwarding bool
	// TxGSO turns on TCP segmentation offload from client to server
	// (tso.go). On a Client, the endpoint takes TCP super-packets of up
	// to the MTU from its stack (gVisor's host GSO) and hands them to the
	// server whole: set it when the server offers it (LinkConfig.TxGSO).
	// On a Server, it accepts them; without it a flagged frame is a
	// protocol violation.
	TxGSO bool
	// RxGSO turns on checksum offload from server to client (tso.go).
	// On a Server, it offers the client TCP packets whole with a partial
	// checksum, flagged in the RX completion's meta word, once the client
	// accepted them on the peer socket (LinkConfig.RxGSO; needs PeerFD);
	// before that, and for a client that never accepts, packets go with
	// full checksums. On a Client, it accepts them: set it when the server
	// offers it; the client then takes flagged packets as checksummed.
	RxGSO bool
	// RxLimit bounds what the peer can make this endpoint receive (see
	// endpoint.RxLimit); the zero value limits nothing.
	RxLimit endpoint.RxLimit
	// TxWait is, for a server, the longest WriteFrame and
	// WritePacketsWaiting wait for room in the client's full receive ring
	// (the writes of a pod's own traffic: see Server.WritePacketsWaiting),
	// in all for one call; zero never waits. Once a wait ran out, the
	// server waits no more until the client frees room: a client that
	// stopped reading costs one wait, not one per frame. The wait lets go
	// of the link's transmit lock between tries: the link's other writers
	// (which do not wait) go on meanwhile. A client's writes always wait
	// up to DefaultClientTxWait, holding its lock: the sandbox's own.
	TxWait time.Duration
	// Poll is the longest the receive loop polls an empty ring before it
	// sleeps on the eventfd (endpoint.Poll: how long within that follows
	// the gaps between the link's frames). Zero means
	// endpoint.DefaultPollMax; negative means never poll.
	Poll time.Duration
	// Logger receives the endpoint's rare events (violations, peer loss).
	Logger *slog.Logger
}

func (o *Options) validate() error {
	var errs []error
	if err := linkspec.CheckMTU(int(o.MTU), linkspec.MinMTU); err != nil {
		errs = append(errs, fmt.Errorf("MTU %w", err))
	}
	if l := len(o.LinkAddress); l != 0 && l != header.EthernetAddressSize {
		errs = append(errs, fmt.Errorf("link address of %d bytes, want 0 or 6", l))
	}
	if err := o.RxLimit.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ringReader is the consuming half of a link: a Receiver or a Poster.
type ringReader interface {
	Ready() bool
	Recv(alloc func(int) []byte) ([]byte, error)
	Flush()
	EnableNotification()
	DisableNotification()
	Close()
}

// ringWriter is the producing half of a link: a Filler or a Sender.
type ringWriter interface {
	Send(parts [][]byte, total int) (bool, error)
	Flush() (notify bool)
	Close()
}

// metaWriter is a ringWriter whose frames carry a meta word: a Sender.
type metaWriter interface {
	SendMeta(parts [][]byte, total int, meta uint32) (bool, error)
}

// queueEndpoint is what the server and client endpoints share: the stack-facing
// half of stack.LinkEndpoint, the receive loop and the lifecycle.
//
// Lifecycle: Attach(d) starts the receive loop, the peer watcher and a
// supervisor. stop(reason) — from Close, from Attach(nil), on peer loss or on
// a violation — interrupts them; the supervisor waits for the other two,
// releases every mapping and descriptor, calls OnClosed for a reason other
// than Close, and exits. Wait waits for the supervisor. An endpoint never
// attached releases in Close.
type queueEndpoint struct {
	mtu      uint32                         // immutable
	addr     tcpip.LinkAddress              // immutable
	framing  endpoint.Framing               // immutable: Ethernet when addr is set
	caps     stack.LinkEndpointCapabilities // immutable
	poll     time.Duration                  // immutable: Options.Poll
	coalesce bool                           // immutable: join TCP segments (coalesce.go)
	gsoTx    bool                           // immutable: client sending TCP super-packets (tso.go)
	gsoRx    bool                           // immutable: accepting flagged frames from the peer (tso.go)
	// offerRx is a server's Options.RxGSO (immutable); rxOffload is set
	// once the client accepted (watchPeer), and only then does WritePackets
	// flag frames.
	offerRx   bool
	rxOffload atomic.Bool
	// checked is set by a client's receive loop while it delivers a
	// frame flagged for checksum offload: see Capabilities.
	checked  atomic.Bool
	forward  bool                // immutable: Options.Forwarding
	onClosed func(error)         // immutable
	log      *slog.Logger        // immutable
	limit    *endpoint.RxLimiter // owned by the receive loop
	stats    endpoint.Stats

	rx ringReader // owned by the receive loop once started
	// recv is rx when it is a server's, nil otherwise; immutable.
	recv *queue.Receiver
	// holding is set by HoldFrames: the receive loop holds large frames
	// flagged for offload in the client's buffers (direct.go).
	holding atomic.Bool
	// held is the receive loop's record of held frames (direct.go), nil
	// until holding is first used.
	held *heldState
	// runs is the receive loop's room for coalescing (coalesce.go), nil
	// on a link that does not coalesce.
	runs *runScratch
	// rxMeta returns the meta word of the frame rx returned last (a
	// server's, or a client's that accepts RxGSO), nil otherwise; immutable.
	rxMeta  func() uint32
	rxEvent *queue.Event // the eventfd the receive loop sleeps on; immutable
	txEvent *queue.Event // the eventfd the peer sleeps on; immutable
	peer    *os.File     // dup of PeerFD or nil; immutable

	// txMu serialises writers and guards tx and txParts.
	txMu sync.Mutex
	// +checklocks:txMu
	tx ringWriter // nil once released
	// +checklocks:txMu
	txParts [][]byte
	// txWait is how long WritePackets may wait for room (the client waits
	// briefly for completions; the router's slow path never waits).
	// Immutable.
	txWait time.Duration
	// podWait is a server's Options.TxWait; immutable.
	podWait time.Duration
	// txStalled is set when a server's wait ran out, and cleared when a
	// frame found room: until then its writes do not wait.
	// +checklocks:txMu
	txStalled bool

	// mu guards the lifecycle fields below.
	mu sync.Mutex
	// +checklocks:mu
	dispatcher stack.NetworkDispatcher
	// +checklocks:mu
	started bool
	// +checklocks:mu
	stopped bool
	// +checklocks:mu
	released bool
	// +checklocks:mu
	reason error

	stopping atomic.Bool
	done     chan struct{} // closed by stop
	wg       sync.WaitGroup
}

func newQueueEndpoint(o *Options, rx ringReader, tx ringWriter, rxEventFD, txEventFD int) (*queueEndpoint, error) {
	l := &queueEndpoint{
		mtu:      o.MTU,
		addr:     o.LinkAddress,
		poll:     o.Poll,
		onClosed: o.OnClosed,
		log:      o.Logger,
		rx:       rx,
		tx:       tx,
		done:     make(chan struct{}),
	}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	l.framing = endpoint.FramingOf(len(l.addr) != 0)
	l.caps |= l.framing.Capabilities()
	if o.Forwarding {
		l.caps |= stack.CapabilityTXChecksumOffload
		l.coalesce = true
		l.runs = new(runScratch)
		l.forward = true
	}
	switch r := rx.(type) {
	case *queue.Receiver: // a server
		l.recv = r
		l.rxMeta = r.Meta
		l.gsoRx = o.TxGSO
		l.offerRx = o.RxGSO
	case *queue.Poster: // a client
		l.gsoTx = o.TxGSO
		if o.RxGSO {
			l.rxMeta = r.Meta
			l.gsoRx = true
		}
	}
	l.limit = endpoint.NewRxLimiter(o.RxLimit, rxBatch, l.maxFrame(), &l.stats)
	ok := false
	defer func() {
		if !ok {
			l.release()
		}
	}()
	var err error
	if l.rxEvent, err = queue.OpenEvent(rxEventFD); err != nil {
		return nil, err
	}
	if l.txEvent, err = queue.OpenEvent(txEventFD); err != nil {
		return nil, err
	}
	if o.PeerFD >= 0 {
		fd, err := unix.FcntlInt(uintptr(o.PeerFD), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("dup peer fd %d: %w", o.PeerFD, err)
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("peer fd %d: set non-blocking: %w", o.PeerFD, err)
		}
		l.peer = os.NewFile(uintptr(fd), "peer")
	}
	if _, client := rx.(*queue.Poster); client && o.RxGSO && l.peer != nil {
		if _, err := l.peer.Write([]byte{rxOffloadAccept}); err != nil {
			return nil, fmt.Errorf("accept checksum offload on the peer socket: %w", err)
		}
	}
	ok = true
	return l, nil
}

// maxFrame is the largest frame the link carries.
func (l *queueEndpoint) maxFrame() uint32 { return l.mtu + l.framing.HeaderLength() }

// TakesPartialTCPChecksum reports whether the link writes TCP packets with
// a partial checksum (GSO options with NeedsCsum) that fit its MTU whole,
// leaving the checksum to the peer: a server whose client took checksum
// offload (Options.RxGSO). It may change when the client changes.
func (l *queueEndpoint) TakesPartialTCPChecksum() bool { return l.rxOffload.Load() }

// Stats returns the link's counters.
func (l *queueEndpoint) Stats() *endpoint.Stats { return &l.stats }

// MTU implements stack.LinkEndpoint.MTU.
func (l *queueEndpoint) MTU() uint32 { return l.mtu }

// SetMTU implements stack.LinkEndpoint.SetMTU. The MTU is agreed with the
// peer when the link is made and cannot change.
func (l *queueEndpoint) SetMTU(uint32) {}

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength.
func (l *queueEndpoint) MaxHeaderLength() uint16 { return uint16(l.framing.HeaderLength()) }

// LinkAddress implements stack.LinkEndpoint.LinkAddress.
func (l *queueEndpoint) LinkAddress() tcpip.LinkAddress { return l.addr }

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress. The address
// is agreed with the peer when the link is made and cannot change.
func (l *queueEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint.Capabilities.
//
// A client that took checksum offload (Options.RxGSO) claims RX checksum
// offload while it delivers a frame the server flagged, and only then:
// gVisor's NIC takes a packet's RXChecksumValidated from this capability
// (stack's nic.DeliverNetworkPacket), and no other part of the stack reads
// that bit; the link's other frames are checked by the stack as before.
func (l *queueEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	if l.checked.Load() {
		return l.caps | stack.CapabilityRXChecksumOffload
	}
	return l.caps
}

// SupportedGSO implements stack.GSOEndpoint: host GSO on a client with
// TxGSO (tso.go), none otherwise.
func (l *queueEndpoint) SupportedGSO() stack.SupportedGSO {
	if l.gsoTx {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// GSOMaxSize implements stack.GSOEndpoint: a super-packet is at most an IP
// packet of the link's MTU, so that it is one frame.
func (l *queueEndpoint) GSOMaxSize() uint32 {
	if l.gsoTx {
		return l.mtu
	}
	return 0
}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (l *queueEndpoint) ARPHardwareType() header.ARPHardwareType { return l.framing.ARPHardwareType() }

// AddHeader implements stack.LinkEndpoint.AddHeader.
func (l *queueEndpoint) AddHeader(pkt *stack.PacketBuffer) { l.framing.AddHeader(pkt, l.addr) }

// ParseHeader implements stack.LinkEndpoint.ParseHeader.
func (l *queueEndpoint) ParseHeader(pkt *stack.PacketBuffer) bool { return l.framing.ParseHeader(pkt) }

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (*queueEndpoint) SetOnCloseAction(func()) {}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (l *queueEndpoint) IsAttached() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dispatcher != nil
}

// Attach implements stack.LinkEndpoint.Attach. A nil dispatcher (the NIC is
// being removed) stops the link for good; it does not wait, because the
// stack calls it with its own lock held.
func (l *queueEndpoint) Attach(d stack.NetworkDispatcher) {
	if d == nil {
		l.stop(nil)
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped || l.started {
		l.dispatcher = d
		return
	}
	l.dispatcher = d
	l.started = true
	rxDone := make(chan struct{})
	peerDone := make(chan struct{})
	l.wg.Add(1)
	go l.receiveLoop(d, rxDone)
	go l.watchPeer(peerDone)
	go l.supervise(rxDone, peerDone)
}

// Close implements stack.LinkEndpoint.Close. It does not wait: Wait does.
func (l *queueEndpoint) Close() { l.stop(nil) }

// Wait implements stack.LinkEndpoint.Wait. It returns once every goroutine
// of the endpoint has exited and its memory and descriptors are released.
func (l *queueEndpoint) Wait() { l.wg.Wait() }

// stop stops the link once; the first reason wins.
func (l *queueEndpoint) stop(reason error) {
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return
	}
	l.stopped = true
	l.reason = reason
	started := l.started
	l.mu.Unlock()
	l.stopping.Store(true)
	close(l.done)
	l.rxEvent.Interrupt()
	if l.peer != nil {
		l.peer.SetReadDeadline(time.Unix(1, 0))
	}
	if !started {
		l.release()
	}
}

// release unmaps the queues and closes every descriptor, once.
func (l *queueEndpoint) release() {
	l.mu.Lock()
	if l.released {
		l.mu.Unlock()
		return
	}
	l.released = true
	l.mu.Unlock()
	l.txMu.Lock()
	if l.tx != nil {
		l.tx.Close()
		l.tx = nil
	}
	l.txMu.Unlock()
	if l.rx != nil {
		l.rx.Close()
	}
	if l.rxEvent != nil {
		l.rxEvent.Close()
	}
	if l.txEvent != nil {
		l.txEvent.Close()
	}
	if l.peer != nil {
		l.peer.Close()
	}
}

// supervise waits for the receive loop and the peer watcher, releases the
// link and reports why it stopped.
func (l *queueEndpoint) supervise(rxDone, peerDone <-chan struct{}) {
	defer l.wg.Done()
	<-rxDone
	<-peerDone
	l.release()
	l.mu.Lock()
	reason := l.reason
	l.mu.Unlock()
	l.log.Debug("shared-memory link released", "reason", reason)
	if reason != nil {
		l.log.Warn("shared-memory link stopped", "reason", reason)
		if l.onClosed != nil {
			l.onClosed(reason)
		}
	}
}

// watchPeer waits for the peer to close its end of the peer socket.
func (l *queueEndpoint) watchPeer(done chan<- struct{}) {
	defer close(done)
	if l.peer == nil {
		return
	}
	var b [1]byte
	for {
		n, err := l.peer.Read(b[:])
		if l.stopping.Load() {
			return
		}
		if err == nil && n == 1 && b[0] == rxOffloadAccept && l.offerRx && !l.rxOffload.Load() {
			// The client takes partial checksums (Options.RxGSO).
			l.rxOffload.Store(true)
			continue
		}
		switch {
		case err == nil:
			// Anything else a peer writes ends the link, as its end of
			// file does (dial.go: neither side writes more).
			err = fmt.Errorf("%w: it wrote on the peer socket", ErrPeerClosed)
		case errors.Is(err, io.EOF):
			err = ErrPeerClosed
		default:
			err = fmt.Errorf("%w: %v", ErrPeerClosed, err)
		}
		l.stop(err)
		return
	}
}

// receiveLoop copies frames out of the receive ring and delivers them,
// polling briefly and then sleeping when the ring is empty.
func (l *queueEndpoint) receiveLoop(d stack.NetworkDispatcher, done chan<- struct{}) {
	defer close(done)
	var (
		views  [rxBatch]*buffer.View
		metas  [rxBatch]uint32
		sizes  [rxBatch]int
		cur    *buffer.View
		allocs = func(n int) []byte {
			cur = buffer.NewViewSize(n)
			return cur.AsSlice()
		}
	)
	poll := endpoint.NewPoll(l.poll)
	hold := l.holdFunc()
	l.rx.DisableNotification()
	for !l.stopping.Load() {
		n, size := 0, 0
		var err error
		holding := hold != nil && l.holding.Load()
		if holding && l.held == nil {
			l.held = &heldState{}
		}
		for n < rxBatch {
			var f []byte
			held := false
			if holding && l.held.n < maxHeld {
				f, held, err = l.recv.RecvHead(allocs, hold, &l.held.frames[l.held.n])
			} else {
				f, err = l.rx.Recv(allocs)
			}
			if err != nil || f == nil {
				break
			}
			views[n], sizes[n] = cur, len(f)
			if held {
				sizes[n] += l.held.frames[l.held.n].RestSize()
				l.held.n++
			}
			if l.rxMeta != nil {
				metas[n] = l.rxMeta()
			}
			size += sizes[n]
			n++
		}
		if n > 0 {
			hoptrace.Mark(hoptrace.Rx)
			poll.Arrived()
			l.rx.Flush()
			verr := l.deliverBatch(d, views[:n], metas[:n], sizes[:n])
			hoptrace.Mark(hoptrace.Delivered)
			clear(views[:n])
			clear(metas[:n])
			if verr == nil && holding {
				verr = l.completeHeld()
			}
			if verr != nil {
				l.stats.Violations.Add(1)
				l.stop(verr)
				return
			}
			if !l.limit.Take(n, size, l.done) {
				return
			}
		}
		if err != nil {
			l.stats.Violations.Add(1)
			l.stop(err)
			return
		}
		if n > 0 {
			continue
		}
		if poll.Wait(l.rx.Ready, l.stopping.Load) {
			continue
		}
		l.rx.EnableNotification()
		if l.rx.Ready() {
			l.rx.DisableNotification()
			continue
		}
		hoptrace.Mark(hoptrace.Sleep)
		err = l.rxEvent.Wait()
		hoptrace.Mark(hoptrace.Wake)
		if err != nil {
			if !errors.Is(err, queue.ErrClosed) {
				l.log.Error("shared-memory link: waiting on eventfd", "err", err)
				l.stop(fmt.Errorf("wait on eventfd: %w", err))
			}
			return
		}
		l.rx.DisableNotification()
	}
}

// A large frame is delivered as two views: its first headerSplit bytes in a
// chunk of their own, the rest in the chunk it was copied into. gVisor's
// IPv4 and IPv6 endpoints keep a reference to the network header's view
// while they parse a packet (parseAndValidate returns
// NetworkHeader().View()), and a later NetworkHeader().Slice() then finds
// the chunk shared and clones it whole (buffer.PullUp): 64 KiB copied for
// every large segment a sandbox received, 1.2% of the machine's time in a
// sandbox-to-sandbox profile at MTU 65000. With the headers apart, that
// clone is of 256 bytes.
const (
	// headerSplit covers Ethernet (14) + IPv6 (40) or IPv4 with options
	// (60) + TCP with options (60), with room for extension headers.
	headerSplit = 256
	// splitFrom is the smallest frame split: the copy of the headers costs
	// more than it saves on small frames.
	splitFrom = 4096
)

// framePayload is the packet payload of frame v (owned from the call on).
func framePayload(v *buffer.View) buffer.Buffer {
	if v.Size() < splitFrom {
		return buffer.MakeWithView(v)
	}
	h := buffer.NewViewWithData(v.AsSlice()[:headerSplit])
	v.TrimFront(headerSplit)
	payload := buffer.MakeWithView(h)
	rest := buffer.MakeWithView(v)
	payload.Merge(&rest)
	return payload
}

// deliverBatch hands the frames of one receive batch, with their meta words
// and sizes, to the stack in order: TCP super-packets from the peer's offload (tso.go)
// as such, the others as deliverPlain does. A frame whose view is shorter
// than its size is held (direct.go): the next of l.held's frames. It
// returns a protocol violation of the peer; the frames it did not deliver
// then are dropped.
func (l *queueEndpoint) deliverBatch(d stack.NetworkDispatcher, views []*buffer.View, metas []uint32, sizes []int) error {
	start, held := 0, 0
	for i, m := range metas {
		if m == 0 {
			continue
		}
		l.deliverPlain(d, views[start:i])
		start = i + 1
		if !l.gsoRx {
			l.stats.RxDrops.Add(uint64(len(views) - i))
			return fmt.Errorf("%w: TX meta word %#08x on a link without offloads", queue.ErrViolation, m)
		}
		mss, n, err := offloadFrame(views[i], sizes[i], l.framing == endpoint.Ethernet, m)
		if err != nil {
			l.stats.RxDrops.Add(uint64(len(views) - i))
			return err
		}
		var h *queue.Held
		if views[i].Size() < sizes[i] {
			h = &l.held.frames[held]
			held++
		}
		if n == 0 {
			l.stats.RxDrops.Add(1)
			continue
		}
		proto, _ := l.framing.Protocol(views[i].AsSlice()) // an IP packet: checked
		if h != nil && n <= views[i].Size() {
			views[i].CapLength(n) // all padding past the head
			h = nil
		}
		if h == nil {
			l.deliverPayload(d, proto, framePayload(views[i]), 1, n, mss)
			continue
		}
		h.Truncate(n - views[i].Size())
		if err := l.deliverHeld(d, proto, views[i], h, n, mss); err != nil {
			l.stats.RxDrops.Add(uint64(len(views) - i - 1))
			return err
		}
	}
	l.deliverPlain(d, views[start:])
	return nil
}

// deliverHeld hands the stack a held frame of size bytes (direct.go): its
// head in v, the rest in h, whose buffers it hands back to the client as
// soon as the delivery returned (the client may be waiting for them). It
// returns a protocol violation of the peer.
func (l *queueEndpoint) deliverHeld(d stack.NetworkDispatcher, proto tcpip.NetworkProtocolNumber, v *buffer.View, h *queue.Held, size int, mss uint16) error {
	st := l.held
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: heldPayload(v, size)})
	l.framing.ConsumeHeader(pkt)
	st.pkt, st.frame, st.head = pkt, h, v.Size()-int(l.framing.HeaderLength())
	endpoint.MarkForwardedGSO(pkt, mss)
	l.stats.RxPackets.Add(1)
	l.stats.RxBytes.Add(uint64(size))
	d.DeliverNetworkPacket(proto, pkt)
	st.pkt, st.frame = nil, nil
	pkt.DecRef()
	err := l.recv.Complete(h)
	l.rx.Flush()
	return err
}

// completeHeld hands the buffers of the batch's held frames that were not
// delivered (dropped) back to the client.
func (l *queueEndpoint) completeHeld() error {
	st := l.held
	for i := range st.n {
		if err := l.recv.Complete(&st.frames[i]); err != nil {
			return err
		}
	}
	if st.n > 0 {
		st.n = 0
		l.rx.Flush()
	}
	return nil
}

// holdFunc returns what decides, for the receive loop, which frames to hold
// in the client's buffers once HoldFrames was called, or nil for an
// endpoint that never holds (direct.go): a server's TCP frames flagged for
// segmentation offload of at least splitFrom bytes, up to maxHeld a batch.
func (l *queueEndpoint) holdFunc() func(size, meta uint32) int {
	if l.recv == nil || !l.gsoRx || !l.forward {
		return nil
	}
	return func(size, meta uint32) int {
		if meta == 0 || size < splitFrom {
			return 0
		}
		return headerSplit
	}
}

// deliverPlain hands frames to the stack, in order: on a Forwarding link
// with runs of one TCP flow's segments joined (coalesce.go).
func (l *queueEndpoint) deliverPlain(d stack.NetworkDispatcher, views []*buffer.View) {
	if !l.coalesce {
		for _, v := range views {
			l.deliver(d, v)
		}
		return
	}
	coalesceRuns(views, l.framing == endpoint.Ethernet, l.runs, func(run []segment, single *buffer.View) {
		if single != nil {
			l.deliver(d, single)
			return
		}
		size := 0
		for i := range run {
			size += run[i].v.Size()
		}
		vs, mss := joinRun(run)
		proto, _ := l.framing.Protocol(vs[0].AsSlice()) // an IP packet: checked
		payload := framePayload(vs[0])
		for _, v := range vs[1:] {
			payload.Append(v)
		}
		l.deliverPayload(d, proto, payload, len(run), size, mss)
	})
}

// deliver hands one frame to the stack.
func (l *queueEndpoint) deliver(d stack.NetworkDispatcher, v *buffer.View) {
	size := v.Size()
	proto, ok := l.framing.Protocol(v.AsSlice())
	if !ok {
		l.stats.RxDrops.Add(1)
		v.Release()
		return
	}
	l.deliverPayload(d, proto, framePayload(v), 1, size, 0)
}

// deliverPayload hands the stack a packet of protocol made of frames
// received frames of size bytes in all; a non-zero mss marks it a TCP
// super-packet (endpoint's gso.go).
func (l *queueEndpoint) deliverPayload(d stack.NetworkDispatcher, proto tcpip.NetworkProtocolNumber, payload buffer.Buffer, frames, size int, mss uint16) {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	defer pkt.DecRef()
	l.framing.ConsumeHeader(pkt)
	switch {
	case mss == 0:
	case l.forward:
		endpoint.MarkForwardedGSO(pkt, mss)
	default:
		// A stack of our own (a sandbox's): the checksum is partial
		// by the link's contract, the headers were checked
		// (offloadFrame). gVisor's NIC sets RXChecksumValidated of
		// every packet from the link's RX checksum offload capability
		// as it delivers it, on this goroutine: the link claims it
		// for this packet only.
		l.checked.Store(true)
		defer l.checked.Store(false)
	}
	l.stats.RxPackets.Add(uint64(frames))
	l.stats.RxBytes.Add(uint64(size))
	d.DeliverNetworkPacket(proto, pkt)
}

// WritePackets implements stack.LinkEndpoint.WritePackets. A frame that does
// not fit is dropped and counted, never reported as tcpip.ErrWouldBlock
// (which gVisor's IPv4 forwarding does not expect): the return value is
// always the number of packets given.
func (l *queueEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	return l.writePackets(pkts, l.txWait)
}

// writePackets is WritePackets waiting up to wait in all for room.
func (l *queueEndpoint) writePackets(pkts stack.PacketBufferList, wait time.Duration) (int, tcpip.Error) {
	hoptrace.Mark(hoptrace.Tx)
	all := pkts.AsSlice()
	var violation error
	defer func() {
		// After txMu is released: stop may release the link.
		if violation != nil {
			l.stop(violation)
		}
	}()
	l.txMu.Lock()
	defer l.txMu.Unlock()
	if l.tx == nil || l.stopping.Load() {
		l.stats.TxDrops.Add(uint64(len(all)))
		return len(all), nil
	}
	waited := txWaiting{limit: wait}
	for i, pkt := range all {
		if l.gsoTx && endpoint.IsTCPGSO(pkt) && pkt.GSOOptions.NeedsCsum {
			// Our own stack's TCP, with the offload (tso.go).
			if violation = l.sendOffloadLocked(pkt, &waited); violation != nil {
				l.stats.TxDrops.Add(uint64(len(all) - i - 1))
				return len(all), nil
			}
			continue
		}
		if endpoint.IsTCPGSO(pkt) && pkt.GSOOptions.NeedsCsum && pkt.GSOOptions.MSS != 0 && l.rxOffload.Load() &&
			uint32(pkt.Size()) <= l.maxFrame() {
			// A TCP packet with a partial checksum that fits the link,
			// to a client that takes them (RxGSO, tso.go): whole. A
			// larger one is cut below: a frame beyond the MTU might
			// need more buffers than a client's ring gives a frame.
			parts, total := endpoint.AppendSlices(l.txParts[:0], pkt)
			l.txParts = parts
			if violation = l.sendLocked(parts, total, encodeTxOffload(&pkt.GSOOptions), &waited); violation != nil {
				l.stats.TxDrops.Add(uint64(len(all) - i - 1))
				return len(all), nil
			}
			continue
		}
		if endpoint.IsTCPGSO(pkt) {
			// A TCP super-packet forwarded from a kernel pod (see
			// endpoint's gso.go): the peer takes no GSO, so it gets segments.
			if violation = l.sendSoftwareGSOLocked(pkt, &waited); violation != nil {
				l.stats.TxDrops.Add(uint64(len(all) - i - 1))
				return len(all), nil
			}
			continue
		}
		parts, total := endpoint.AppendSlices(l.txParts[:0], pkt)
		l.txParts = parts
		if violation = l.sendLocked(parts, total, 0, &waited); violation != nil {
			l.stats.TxDrops.Add(uint64(len(all) - i - 1))
			return len(all), nil
		}
	}
	clear(l.txParts)
	l.flushTxLocked()
	return len(all), nil
}

// sendSoftwareGSOLocked sends a TCP GSO packet as the frames SoftwareGSO
// makes of a private copy of it. It returns a protocol violation of the
// peer, after which the link's tx is gone.
//
// +checklocks:l.txMu
func (l *queueEndpoint) sendSoftwareGSOLocked(pkt *stack.PacketBuffer, w *txWaiting) error {
	flat := pkt.ToView()
	defer flat.Release()
	var violation error
	ok := endpoint.SoftwareGSO(flat.AsSlice(), l.framing == endpoint.Ethernet, pkt.GSOOptions, l.mtu, func(frame []byte, _ bool) {
		// SoftwareGSO calls back before it returns, with l.txMu held (the
		// analyzer cannot see that: the lines that need it are exempt).
		if violation != nil || l.tx == nil { // +checklocksignore
			l.stats.TxDrops.Add(1)
			return
		}
		parts := append(l.txParts[:0], frame)             // +checklocksignore
		l.txParts = parts                                 // +checklocksignore
		violation = l.sendLocked(parts, len(frame), 0, w) // +checklocksignore
	})
	if !ok {
		l.stats.TxDrops.Add(1)
	}
	return violation
}

// sendOffloadLocked sends a TCP packet of the link's own stack built for
// host GSO whole with its meta word, its checksum partial: a super-packet,
// or a packet of one segment, whose checksum the router leaves to whoever
// takes partial ones (a kernel, a sandbox with checksum offload) or
// completes (tso.go). A packet without data (gVisor's TCP builds its ACKs,
// SYNs and FINs for host GSO too) or without an MSS goes plain, its
// checksum completed: there is nothing to offload, and a kernel takes no
// GSO packet without a payload.
//
// +checklocks:l.txMu
func (l *queueEndpoint) sendOffloadLocked(pkt *stack.PacketBuffer, w *txWaiting) error {
	var meta uint32
	if pkt.GSOOptions.MSS > 0 && pkt.Data().Size() > 0 {
		meta = encodeTxOffload(&pkt.GSOOptions)
	} else {
		completeTCPChecksum(pkt)
	}
	parts, total := endpoint.AppendSlices(l.txParts[:0], pkt)
	l.txParts = parts
	return l.sendLocked(parts, total, meta, w)
}

// txWaiting is how long one write call may wait for room in the peer's
// ring, and has waited.
type txWaiting struct {
	limit, waited time.Duration
}

// sendLocked puts one frame (parts, total bytes, with meta: see tso.go) on
// the TX ring, waiting while w allows for room, and counts it sent or
// dropped. It returns a protocol violation of the peer, after which tx is
// closed and nil.
//
// +checklocks:l.txMu
func (l *queueEndpoint) sendLocked(parts [][]byte, total int, meta uint32, w *txWaiting) error {
	if l.tx == nil || uint32(total) > l.maxFrame() {
		// Gone while an earlier frame of this write waited (see below).
		l.stats.TxDrops.Add(1)
		return nil
	}
	server := l.recv != nil
	limit := w.limit
	if l.txStalled {
		limit = 0
	}
	ok, err := l.sendFrameLocked(parts, total, meta)
	if !ok && err == nil && w.waited < limit {
		// The peer's ring is full of frames it has not taken (a
		// client's to the server) or of buffers it has not posted
		// back (a server's to the client): publish what we have and
		// wake the peer, once (it then sees every frame published so
		// far, and this writer publishes nothing more while it waits;
		// a flush per try wrote the eventfd per try, half a sandbox's
		// CPU with four senders into one pod), and give it a moment
		// and the CPU.
		l.stats.TxWaits.Add(1)
		l.flushTxLocked()
	}
	for !ok && err == nil && w.waited < limit {
		start := time.Now()
		if server {
			// A server lets go of the link while it waits: its
			// other writers (the uplink, the router's slow path,
			// other pods) try their frames meanwhile, and drop them
			// at once if the ring is still full, instead of queueing
			// behind this one (a client that frees buffers just
			// slowly enough would otherwise hold them all up). They
			// may use the link's parts scratch, which parts may be:
			// this writer keeps it, and the link takes a new one.
			l.txParts = nil
			l.txMu.Unlock()
			runtime.Gosched()
			endpoint.Yield()
			l.txMu.Lock()
			if l.tx == nil || l.stopping.Load() {
				l.stats.TxDrops.Add(1) // closed meanwhile
				return nil
			}
		} else {
			runtime.Gosched()
			endpoint.Yield()
		}
		w.waited += time.Since(start)
		ok, err = l.sendFrameLocked(parts, total, meta)
	}
	switch {
	case ok:
		l.txStalled = false
	case server && err == nil && limit > 0:
		l.txStalled = true // the wait ran out
	}
	if err != nil {
		l.stats.Violations.Add(1)
		l.stats.TxDrops.Add(1)
		l.tx.Close()
		l.tx = nil
		return err
	}
	if !ok {
		l.stats.TxDrops.Add(1)
		return nil
	}
	l.stats.TxPackets.Add(1)
	l.stats.TxBytes.Add(uint64(total))
	return nil
}

// sendFrameLocked is one attempt of sendLocked.
//
// +checklocks:l.txMu
func (l *queueEndpoint) sendFrameLocked(parts [][]byte, total int, meta uint32) (bool, error) {
	if meta != 0 {
		return l.tx.(metaWriter).SendMeta(parts, total, meta)
	}
	return l.tx.Send(parts, total)
}

// flushTxLocked publishes sent frames and wakes the peer if it sleeps.
//
// +checklocks:l.txMu
func (l *queueEndpoint) flushTxLocked() {
	if l.tx != nil && l.tx.Flush() {
		l.txEvent.Notify()
	}
}
