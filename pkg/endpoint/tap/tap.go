//go:build linux

package tap

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// Options configure New.
type Options struct {
	// FD is an fd attached to a TUN/TAP device (from tuntap.Open, or received
	// over SCM_RIGHTS). New duplicates it and owns the duplicate; the
	// caller keeps FD and closes it when it likes. The duplicate shares
	// FD's open file description, which New makes non-blocking.
	FD int
	// MTU is the IP MTU of the link (without the Ethernet header).
	MTU uint32
	// EthernetHeader is true for a TAP device (Ethernet frames, ARP/NDP)
	// and false for a TUN device (bare IP packets).
	EthernetHeader bool
	// LinkAddress is the endpoint's own MAC address on a TAP device: frames
	// to other unicast addresses are dropped. Empty for TUN.
	LinkAddress tcpip.LinkAddress
	// VnetHdr says the device was opened with IFF_VNET_HDR
	// (tuntap.Options.VnetHdr); New checks it against the device.
	VnetHdr bool
	// GSOMaxSize, when non-zero, advertises stack.HostGSOSupported: the
	// stack's own TCP endpoints then send super-packets of up to this many
	// bytes, which the kernel segments. Needs VnetHdr; at most 65535.
	GSOMaxSize uint32
	// Forwarding says the endpoint is a link of a stack that only forwards
	// (the node's router: it terminates no TCP or UDP and rewrites no
	// address). The endpoint then claims TX checksum offload, so that the
	// stack does not recompute the transport checksum of every forwarded
	// packet (they arrive with valid ones, or partial ones the kernel
	// completes); and, with VnetHdr, it delivers the kernel's TCP
	// super-packets whole, marked for endpoint.RestoreForwardedGSO
	// (pkg/endpoint/gso.go), instead of segmenting them. Not for a stack with transport endpoints of its
	// own: their checksums would be left to a device that does not compute
	// them.
	Forwarding bool
	// RxLimit bounds what the pod behind the device can make this endpoint
	// read (see RxLimit; a super-packet is one frame); the zero value
	// limits nothing. Beyond it the kernel's queue for the device fills
	// and the kernel drops.
	RxLimit endpoint.RxLimit
	// OnClosed, if set, is called once, on the endpoint's goroutine, when
	// the device goes away under the endpoint (it was deleted, or a read
	// failed for good); the endpoint has then stopped and closed its fd.
	// It is not called for a stop caused by Close. It must not call Wait.
	OnClosed func(error)
	// Logger receives the endpoint's logs; nil discards them.
	Logger *slog.Logger
}

// OffloadStats count the endpoint's offload work. Every field is updated
// atomically and may be read at any time.
type OffloadStats struct {
	// RxGSOPackets counts TCP super-packets received from the kernel and
	// RxGSOSegments the segments they were cut into.
	RxGSOPackets  atomic.Uint64
	RxGSOSegments atomic.Uint64
	// RxCsumCompleted counts received packets whose partial checksum
	// (VIRTIO_NET_HDR_F_NEEDS_CSUM) was completed in software.
	RxCsumCompleted atomic.Uint64
	// RxUnsupportedGSO counts received frames with a GSO type other than
	// TCP (UDP fragmentation or segmentation offload), dropped and also
	// counted in Stats.RxDrops.
	RxUnsupportedGSO atomic.Uint64
	// TxGSOPackets counts super-packets handed to the kernel to segment.
	TxGSOPackets atomic.Uint64
	// TxFlattened counts packets made of too many pieces to write in
	// place, copied into one buffer first.
	TxFlattened atomic.Uint64
	// RxGSOPassed counts TCP super-packets delivered whole to a forwarding
	// stack (Options.Forwarding).
	RxGSOPassed atomic.Uint64
	// TxSoftwareGSO counts GSO packets this endpoint could not hand to the
	// kernel (no virtio-net header) and cut into segments itself.
	TxSoftwareGSO atomic.Uint64
}

// Endpoint is a stack.LinkEndpoint driving a TUN or TAP device through
// its fd: one goroutine reads frames (parked on the runtime's poller, not on
// an OS thread of its own) and delivers them to the stack; WritePackets
// writes with one non-blocking writev per frame and drops when the device
// queue is full.
//
// With a virtio-net header, received TCP super-packets are segmented and
// partial checksums completed, so every packet handed to the stack carries
// valid checksums, as the router needs to forward it.
//
// Lifecycle: New; Attach with a dispatcher (stack.CreateNIC) starts the
// reader; Attach(nil) (stack.RemoveNIC, Stack.Destroy) stops it; Close
// closes the fd; Wait returns once the reader has exited, and after Close
// once the fd is closed too. If the device goes away first, the endpoint
// stops and closes the fd by itself and calls Options.OnClosed.
//
// A TAP fd keeps the network namespace it was opened in alive (see
// tuntap.Open), so removing a pod's namespace does not stop the endpoint:
// delete the device, or Close the endpoint.
type Endpoint struct {
	// Immutable after New.
	file       *os.File // owns fd; closed by closeFile
	name       string   // device name
	framing    endpoint.Framing
	vnetHdr    bool
	gsoMaxSize uint32
	forwarding bool
	onClosed   func(error)
	log        *slog.Logger
	limit      *endpoint.RxLimiter // used by the reader only

	stats   endpoint.Stats
	offload OffloadStats

	mtu      atomic.Uint32
	linkAddr atomic.Pointer[tcpip.LinkAddress]

	// wg counts the reader goroutine.
	wg sync.WaitGroup

	// mu guards the reader's lifecycle. Every read deadline is set with mu
	// held, so the reader and its stoppers agree on why a read timed out.
	mu sync.Mutex
	// +checklocks:mu
	dispatcher stack.NetworkDispatcher
	// reading is set while the reader goroutine runs.
	// +checklocks:mu
	reading bool
	// closing is set by Close.
	// +checklocks:mu
	closing bool
	// gone is set when the device went away under the reader.
	// +checklocks:mu
	gone bool
	// +checklocks:mu
	onCloseAction func()

	// fdMu keeps fd open while a writer uses it. mu and fdMu are never held
	// together.
	fdMu sync.RWMutex
	// fd is the fd behind file, for writev; it is set once by New and
	// closed, with file, under fdMu.
	// +checklocks:fdMu
	fd int
	// +checklocks:fdMu
	fdClosed bool
}

var (
	_ stack.LinkEndpoint = (*Endpoint)(nil)
	_ stack.GSOEndpoint  = (*Endpoint)(nil)
)

// maxIPPacket is the largest IPv4 packet: its total length is 16 bits.
const maxIPPacket = linkspec.MaxMTU

// maxConsecutiveReadErrors is how many unexpected read errors in a row the
// reader tolerates before it treats the device as gone.
const maxConsecutiveReadErrors = 16

// New returns an endpoint for the TUN/TAP device opts.FD is attached to.
// It checks opts against the device (TAP vs TUN, virtio-net header).
func New(opts Options) (*Endpoint, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("new tap endpoint: %w", err)
	}
	fd, info, err := dupTAP(opts.FD)
	if err != nil {
		return nil, fmt.Errorf("new tap endpoint: %w", err)
	}
	// From here fd is owned by file.
	file := os.NewFile(uintptr(fd), "tap:"+info.Name)
	fail := func(err error) (*Endpoint, error) {
		file.Close()
		return nil, fmt.Errorf("new tap endpoint %s: %w", info.Name, err)
	}
	switch {
	case info.TUN == opts.EthernetHeader:
		return fail(fmt.Errorf("device is tun=%t but EthernetHeader=%t", info.TUN, opts.EthernetHeader))
	case info.VnetHdr != opts.VnetHdr:
		return fail(fmt.Errorf("device has vnet_hdr=%t but VnetHdr=%t", info.VnetHdr, opts.VnetHdr))
	case info.VnetHdr && info.VnetHdrSize != virtioNetHdrLen:
		return fail(fmt.Errorf("device virtio-net header is %d bytes, want %d", info.VnetHdrSize, virtioNetHdrLen))
	}
	// Only a file registered with the poller takes deadlines; Close needs
	// them to stop the reader.
	if err := file.SetReadDeadline(time.Time{}); err != nil {
		return fail(fmt.Errorf("fd is not pollable: %w", err))
	}

	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Endpoint{
		file:       file,
		fd:         fd,
		name:       info.Name,
		framing:    endpoint.FramingOf(opts.EthernetHeader),
		vnetHdr:    opts.VnetHdr,
		gsoMaxSize: opts.GSOMaxSize,
		forwarding: opts.Forwarding,
		onClosed:   opts.OnClosed,
		log:        log.With("link", info.Name),
	}
	e.limit = endpoint.NewRxLimiter(opts.RxLimit, tapChargeEvery, readBufSize, &e.stats)
	e.mtu.Store(opts.MTU)
	addr := opts.LinkAddress
	e.linkAddr.Store(&addr)
	return e, nil
}

func (o *Options) validate() error {
	var errs []error
	if o.FD < 0 {
		errs = append(errs, fmt.Errorf("FD %d is negative", o.FD))
	}
	if err := linkspec.CheckMTU(int(o.MTU), linkspec.MinMTU); err != nil {
		errs = append(errs, fmt.Errorf("MTU %w", err))
	}
	if o.EthernetHeader && len(o.LinkAddress) != header.EthernetAddressSize {
		errs = append(errs, fmt.Errorf("LinkAddress %q is not a MAC address", o.LinkAddress))
	}
	if !o.EthernetHeader && o.LinkAddress != "" {
		errs = append(errs, fmt.Errorf("LinkAddress %q given for a TUN device", o.LinkAddress))
	}
	if o.GSOMaxSize > 0 && !o.VnetHdr {
		errs = append(errs, errors.New("GSOMaxSize needs VnetHdr"))
	}
	if err := o.RxLimit.Validate(); err != nil {
		errs = append(errs, err)
	}
	if o.GSOMaxSize > maxIPPacket {
		errs = append(errs, fmt.Errorf("GSOMaxSize %d above %d", o.GSOMaxSize, maxIPPacket))
	}
	return errors.Join(errs...)
}

// Name returns the name of the device.
func (e *Endpoint) Name() string { return e.name }

// Stats returns the endpoint's packet counters.
func (e *Endpoint) Stats() *endpoint.Stats { return &e.stats }

// OffloadStats returns the endpoint's offload counters.
func (e *Endpoint) OffloadStats() *OffloadStats { return &e.offload }

// MTU implements stack.LinkEndpoint.MTU.
func (e *Endpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.LinkEndpoint.SetMTU. It changes what the stack
// sends, not the device's own MTU.
func (e *Endpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength. The
// virtio-net header is written from its own buffer and needs no room.
func (e *Endpoint) MaxHeaderLength() uint16 { return uint16(e.framing.HeaderLength()) }

// LinkAddress implements stack.LinkEndpoint.LinkAddress.
func (e *Endpoint) LinkAddress() tcpip.LinkAddress { return *e.linkAddr.Load() }

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress.
func (e *Endpoint) SetLinkAddress(addr tcpip.LinkAddress) { e.linkAddr.Store(&addr) }

// Capabilities implements stack.LinkEndpoint.Capabilities.
//
// A TAP endpoint needs link resolution (ARP, NDP). Neither checksum offload
// is claimed: TX checksums are computed by the stack (the kernel is told to
// finish them only for the stack's own TCP super-packets, through the GSO
// metadata), and RX checksums are verified by the stack, except on segments
// this endpoint cut from a super-packet, whose checksums it computed itself
// and marks as validated per packet.
//
// A Forwarding endpoint claims TX checksum offload (see
// Options.Forwarding).
func (e *Endpoint) Capabilities() stack.LinkEndpointCapabilities {
	c := e.framing.Capabilities()
	if e.forwarding {
		c |= stack.CapabilityTXChecksumOffload
	}
	return c
}

// GSOMaxSize implements stack.GSOEndpoint.GSOMaxSize.
func (e *Endpoint) GSOMaxSize() uint32 { return e.gsoMaxSize }

// WritesTCPGSO reports whether the endpoint writes a TCP packet carrying
// GSO options (stack.GSOTCPv4, GSOTCPv6) to its device whole, as a
// super-packet the kernel segments or takes as one: true with a virtio-net
// header, whatever GSOMaxSize tells the endpoint's own stack. A forwarding
// stack may hand it super-packets of up to the largest IP packet.
func (e *Endpoint) WritesTCPGSO() bool { return e.vnetHdr }

// SupportedGSO implements stack.GSOEndpoint.SupportedGSO.
func (e *Endpoint) SupportedGSO() stack.SupportedGSO {
	if e.vnetHdr && e.gsoMaxSize > 0 {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (e *Endpoint) ARPHardwareType() header.ARPHardwareType { return e.framing.ARPHardwareType() }

// Attach implements stack.LinkEndpoint.Attach. A non-nil dispatcher starts
// the reader. A nil dispatcher (the NIC is being removed) stops it, so that
// Wait returns even before Close: the stack's Wait and Destroy wait for a
// link endpoint before they close it.
func (e *Endpoint) Attach(dispatcher stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = dispatcher
	switch {
	case dispatcher == nil:
		if e.reading {
			e.stopReaderLocked()
		}
	case !e.reading && !e.closing && !e.gone:
		// A reader that stopped left a deadline in the past behind.
		_ = e.file.SetReadDeadline(time.Time{})
		e.reading = true
		e.wg.Add(1)
		go e.readLoop()
	}
	// Otherwise a reader runs, or is stopping and will see the new
	// dispatcher when it wakes.
}

// stopReaderLocked wakes the parked reader at once with a deadline in the
// past.
//
// +checklocks:e.mu
func (e *Endpoint) stopReaderLocked() {
	_ = e.file.SetReadDeadline(time.Unix(1, 0))
}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (e *Endpoint) IsAttached() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.Wait. It returns once the reader
// goroutine has exited: after Close, the fd is then closed too; after
// Attach(nil), the fd stays open until Close.
func (e *Endpoint) Wait() { e.wg.Wait() }

// Close implements stack.LinkEndpoint.Close. It runs the action set by
// SetOnCloseAction and closes the fd: at once when no reader runs,
// otherwise it stops the reader, which closes the fd on its way out. It is
// idempotent and does not wait: call Wait for that.
func (e *Endpoint) Close() {
	e.mu.Lock()
	if e.closing {
		e.mu.Unlock()
		return
	}
	e.closing = true
	action := e.onCloseAction
	reading := e.reading
	if reading {
		e.stopReaderLocked()
	}
	e.mu.Unlock()

	if action != nil {
		action()
	}
	if !reading {
		e.closeFile()
	}
}

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (e *Endpoint) SetOnCloseAction(action func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.onCloseAction = action
}

// closeFile closes the fd once no writer uses it. Safe to call repeatedly.
func (e *Endpoint) closeFile() {
	e.fdMu.Lock()
	defer e.fdMu.Unlock()
	if e.fdClosed {
		return
	}
	e.fdClosed = true
	// The file is non-blocking and was never switched to blocking mode, so
	// Close returns only after the fd is really closed.
	if err := e.file.Close(); err != nil {
		e.log.Warn("close tap fd", "err", err)
	}
}

// readBufSize fits the largest frame the device can hand over: a virtio-net
// header, an Ethernet header and the largest IP (super-)packet, an IPv6
// header with a 64 KiB payload: 10 + 14 + 40 + 65535 = 65599 bytes.
const readBufSize = virtioNetHdrLen + header.EthernetMinimumSize + header.IPv6MinimumSize + header.IPv6MaximumPayloadSize

// tapChargeEvery is how many frames the TAP reader charges to its receive
// limit at once.
const tapChargeEvery = 16

// readLoop reads and delivers frames until it is stopped (Attach(nil),
// Close) or the device goes away. It closes the fd unless only detached.
func (e *Endpoint) readLoop() {
	defer e.wg.Done()
	rd, err := newTAPReader(e.file)
	if err != nil {
		e.stopGone(err)
		return
	}
	defer rd.release()
	emit := e.deliver
	errorsInRow := 0
	// Frames read but not yet charged to the receive limit: charging
	// costs about 100 ns (a clock read and the limiter's lock), so it
	// happens once every tapChargeEvery frames.
	pending, pendingBytes := 0, 0
	for {
		b, err := rd.read()
		if err == nil {
			errorsInRow = 0
			pending++
			pendingBytes += len(b)
			e.handleFrame(b, emit, rd)
			if pending == tapChargeEvery {
				// The wait is short (a few frames at the limit's
				// rates): a stop waits for it.
				e.limit.Take(pending, pendingBytes, nil)
				pending, pendingBytes = 0, 0
			}
			continue
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) && !isDeviceGone(err) {
			// Go's poller may report a device that went away as "not
			// pollable" (EPOLLERR) without reading: ask the kernel.
			err = e.kernelReadErr(rd.big, err)
		}
		var gone error
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			if e.readerShouldStop() {
				return
			}
			continue
		case errors.Is(err, unix.EINVAL):
			// The kernel could not describe one packet in a virtio-net
			// header and dropped it.
			e.stats.RxDrops.Add(1)
			continue
		case isDeviceGone(err) || errors.Is(err, io.EOF):
			gone = err
		default:
			errorsInRow++
			e.log.Warn("tap read", "err", err)
			if errorsInRow < maxConsecutiveReadErrors {
				continue
			}
			gone = err
		}
		e.stopGone(gone)
		return
	}
}

// kernelReadErr reads the device once directly, without the poller, and
// returns the kernel's error for it, or orig when the read succeeds or would
// block (the packet read, if any, is dropped: this runs only on the error
// path).
func (e *Endpoint) kernelReadErr(buf []byte, orig error) error {
	rc, err := e.file.SyscallConn()
	if err != nil {
		return orig
	}
	var rerr error
	if err := rc.Control(func(fd uintptr) { _, rerr = unix.Read(int(fd), buf) }); err != nil {
		return orig
	}
	if rerr == nil || errors.Is(rerr, unix.EAGAIN) {
		return orig
	}
	return rerr
}

// readerShouldStop decides, after a read deadline expired, whether the
// reader exits (closing the fd if the endpoint is closing) or goes on.
func (e *Endpoint) readerShouldStop() bool {
	e.mu.Lock()
	closing := e.closing
	if !closing && e.dispatcher != nil {
		// Detached and attached again before the reader woke up.
		_ = e.file.SetReadDeadline(time.Time{})
		e.mu.Unlock()
		return false
	}
	e.reading = false
	e.mu.Unlock()
	if closing {
		e.closeFile()
	}
	return true
}

// stopGone stops the endpoint after a fatal read error and reports it to
// OnClosed unless the endpoint is closing anyway.
func (e *Endpoint) stopGone(err error) {
	e.mu.Lock()
	e.reading = false
	e.gone = true
	closing := e.closing
	e.mu.Unlock()
	e.closeFile()
	if closing {
		return
	}
	e.log.Info("tap device gone", "err", err)
	if e.onClosed != nil {
		e.onClosed(fmt.Errorf("read tap %s: %w", e.name, err))
	}
}

// handleFrame splits one read into the frames to deliver and counts what
// happened.
// A TCP super-packet a forwarding stack carries whole is taken from rd
// (when it is in rd's pooled buffer) instead of copied; rd may be nil.
func (e *Endpoint) handleFrame(b []byte, emit func([]byte, bool), rd *tapReader) {
	if e.forwarding && e.vnetHdr && e.passGSO(b, rd) {
		return
	}
	kind, err := splitFrame(b, e.vnetHdr, e.framing == endpoint.Ethernet, emit)
	if err != nil {
		e.stats.RxDrops.Add(1)
		if errors.Is(err, errUnsupportedGSO) {
			e.offload.RxUnsupportedGSO.Add(1)
		}
		e.log.Debug("tap drop", "err", err, "len", len(b))
		return
	}
	switch kind {
	case rxSegmented:
		e.offload.RxGSOPackets.Add(1)
	case rxCsumCompleted:
		e.offload.RxCsumCompleted.Add(1)
	}
}

// passGSO delivers b whole when it is a TCP super-packet a forwarding stack
// can carry to its egress (see endpoint's gso.go), and reports whether it did.
func (e *Endpoint) passGSO(b []byte, rd *tapReader) bool {
	if len(b) < virtioNetHdrLen {
		return false
	}
	var h virtioNetHdr
	h.decode(b)
	var v6 bool
	switch h.gsoType &^ virtioNetHdrGSOECN {
	case virtioNetHdrGSOTCPv4:
	case virtioNetHdrGSOTCPv6:
		v6 = true
	default:
		return false
	}
	f, ok := passGSOFrame(b[virtioNetHdrLen:], e.framing == endpoint.Ethernet, v6, &h)
	if !ok {
		return false
	}
	e.offload.RxGSOPassed.Add(1)
	var v *buffer.View
	if rd != nil {
		v = rd.take(virtioNetHdrLen, len(f.Frame))
	}
	e.deliverPacket(f.Frame, v, true, h.gsoSize)
	return true
}

// deliver hands one frame to the stack. validated says its checksums were
// computed by splitFrame.
func (e *Endpoint) deliver(frame []byte, validated bool) {
	if validated {
		e.offload.RxGSOSegments.Add(1)
	}
	e.deliverPacket(frame, nil, validated, 0)
}

// deliverPacket hands one frame to the stack: v, which it owns, when not
// nil (v holds frame's bytes), or else a copy of frame. A non-zero gsoMSS
// marks it as a TCP super-packet with a partial checksum (MarkForwardedGSO).
func (e *Endpoint) deliverPacket(frame []byte, v *buffer.View, validated bool, gsoMSS uint16) {
	drop := func() {
		e.stats.RxDrops.Add(1)
		if v != nil {
			v.Release()
		}
	}
	e.mu.Lock()
	d := e.dispatcher
	e.mu.Unlock()
	if d == nil {
		drop()
		return
	}
	proto, ok := e.framing.Protocol(frame)
	if !ok {
		drop()
		return
	}
	if e.framing == endpoint.Ethernet {
		dst := frame[:header.EthernetAddressSize]
		// Unicast to us, or group (multicast, broadcast: low bit of the
		// first octet, RFC 9542 section 2.1).
		if string(dst) != string(*e.linkAddr.Load()) && dst[0]&1 == 0 {
			drop()
			return
		}
	}
	var payload buffer.Buffer
	if v != nil {
		payload = buffer.MakeWithView(v)
	} else {
		payload = buffer.MakeWithData(frame)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	defer pkt.DecRef()
	e.framing.ConsumeHeader(pkt)
	pkt.NetworkProtocolNumber = proto
	pkt.RXChecksumValidated = validated
	if gsoMSS != 0 {
		endpoint.MarkForwardedGSO(pkt, gsoMSS)
	}
	e.stats.RxPackets.Add(1)
	e.stats.RxBytes.Add(uint64(len(frame)))
	d.DeliverNetworkPacket(proto, pkt)
}

// AddHeader implements stack.LinkEndpoint.AddHeader: an Ethernet header on a
// TAP device, nothing on a TUN device.
func (e *Endpoint) AddHeader(pkt *stack.PacketBuffer) { e.framing.AddHeader(pkt, e.LinkAddress()) }

// ParseHeader implements stack.LinkEndpoint.ParseHeader: it consumes the
// Ethernet header of a TAP frame, or infers IPv4 or IPv6 from the version
// nibble of a TUN packet.
func (e *Endpoint) ParseHeader(pkt *stack.PacketBuffer) bool { return e.framing.ParseHeader(pkt) }

// WritePackets implements stack.LinkEndpoint.WritePackets. Every packet is
// consumed: written, or dropped and counted in Stats.TxDrops when the device
// queue is full, the device is gone or the endpoint is closed. It never
// returns an error, in particular never tcpip.ErrWouldBlock, which the
// stack's IP forwarding cannot handle.
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	e.fdMu.RLock()
	defer e.fdMu.RUnlock()
	n := 0
	for _, pkt := range pkts.AsSlice() {
		n++
		if e.fdClosed {
			e.stats.TxDrops.Add(1)
			continue
		}
		e.writePacketLocked(pkt)
	}
	return n, nil
}

// txIovecs is how many iovecs writePacketLocked keeps on its stack: the
// virtio-net header plus the views of a packet, which for a 64 KiB TCP
// super-packet are a handful. A packet with more views is copied flat.
const txIovecs = 64

// writePacketLocked writes pkt, prefixed by its virtio-net header, with one
// writev. The header and the iovecs live on the stack: no allocation per
// packet. A TCP GSO packet goes to the kernel whole when the device has a
// virtio-net header, and is cut into segments here otherwise.
//
// +checklocksread:e.fdMu
func (e *Endpoint) writePacketLocked(pkt *stack.PacketBuffer) {
	if !e.vnetHdr && endpoint.IsTCPGSO(pkt) {
		e.writeSoftwareGSOLocked(pkt)
		return
	}
	var vnetBuf [virtioNetHdrLen]byte
	var iovArr [txIovecs]unix.Iovec
	n := 0
	gso := false
	if e.vnetHdr {
		h := e.txVnetHdr(pkt)
		gso = h.gsoType != virtioNetHdrGSONone
		h.encode(&vnetBuf)
		iovArr[n] = unix.Iovec{Base: &vnetBuf[0]}
		iovArr[n].SetLen(virtioNetHdrLen)
		n++
	}
	size := 0
	views, off := pkt.AsViewList()
	if n+views.Len() > len(iovArr) {
		// More pieces than iovecs on the stack: write a flat copy.
		e.offload.TxFlattened.Add(1)
		flat := pkt.ToView()
		defer flat.Release()
		if s := flat.AsSlice(); len(s) > 0 {
			iovArr[n] = unix.Iovec{Base: &s[0]}
			iovArr[n].SetLen(len(s))
			n++
			size = len(s)
		}
	} else {
		for v := views.Front(); v != nil; v = v.Next() {
			s := v.AsSlice()
			if off >= len(s) {
				off -= len(s)
				continue
			}
			s = s[off:]
			off = 0
			iovArr[n] = unix.Iovec{Base: &s[0]}
			iovArr[n].SetLen(len(s))
			n++
			size += len(s)
		}
	}
	if e.writeIovecsLocked(iovArr[:n], size) && gso {
		e.offload.TxGSOPackets.Add(1)
	}
}

// writeSoftwareGSOLocked writes a TCP GSO packet to a device without a
// virtio-net header: whole with its checksum completed when it fits the
// MTU, otherwise as segments (SoftwareGSO).
//
// +checklocksread:e.fdMu
func (e *Endpoint) writeSoftwareGSOLocked(pkt *stack.PacketBuffer) {
	flat := pkt.ToView()
	defer flat.Release()
	e.offload.TxSoftwareGSO.Add(1)
	ok := endpoint.SoftwareGSO(flat.AsSlice(), e.framing == endpoint.Ethernet, pkt.GSOOptions, e.MTU(), func(frame []byte, _ bool) {
		var iov [1]unix.Iovec
		iov[0] = unix.Iovec{Base: &frame[0]}
		iov[0].SetLen(len(frame))
		// SoftwareGSO calls back before it returns, with e.fdMu held (the
		// analyzer cannot see that: this line is exempt).
		e.writeIovecsLocked(iov[:], len(frame)) // +checklocksignore
	})
	if !ok {
		e.stats.TxDrops.Add(1)
	}
}

// writeIovecsLocked writes one frame of size bytes and counts it, and
// reports whether the device took it.
//
// +checklocksread:e.fdMu
func (e *Endpoint) writeIovecsLocked(iovs []unix.Iovec, size int) bool {
	if size == 0 {
		e.stats.TxDrops.Add(1)
		return false
	}
	if errno := writeIovec(e.fd, iovs); errno != 0 {
		e.stats.TxDrops.Add(1)
		if errno != unix.EAGAIN && errno != unix.ENOBUFS {
			e.log.Debug("tap write", "err", errno, "len", size)
		}
		return false
	}
	e.stats.TxPackets.Add(1)
	e.stats.TxBytes.Add(uint64(size))
	return true
}

// txVnetHdr returns the virtio-net header for pkt: all zero for an ordinary
// packet; for a TCP packet with GSO options (the stack's own, or a
// forwarded super-packet, see RestoreForwardedGSO), the checksum the kernel
// must complete and, when it is larger than one segment, how to segment it.
// Segments are at most the MSS and at most what fits the link's MTU.
func (e *Endpoint) txVnetHdr(pkt *stack.PacketBuffer) virtioNetHdr {
	var h virtioNetHdr
	opts := pkt.GSOOptions
	var typ uint8
	switch opts.Type {
	case stack.GSOTCPv4:
		typ = virtioNetHdrGSOTCPv4
	case stack.GSOTCPv6:
		typ = virtioNetHdrGSOTCPv6
	default:
		return h
	}
	l2 := int(e.framing.HeaderLength())
	l3 := len(pkt.NetworkHeader().Slice())
	t := tcpHeaderOf(pkt)
	l4 := header.TCPMinimumSize
	if t != nil {
		l4 = int(t.DataOffset())
	}
	h.hdrLen = uint16(l2 + l3 + l4)
	if opts.NeedsCsum {
		// The sender left the pseudo-header sum in the TCP checksum
		// field (CHECKSUM_PARTIAL).
		h.flags = virtioNetHdrFNeedsCsum
		h.csumStart = uint16(l2 + l3)
		h.csumOffset = opts.CsumOffset
	}
	mss := min(int(opts.MSS), int(e.MTU())-l3-l4)
	if mss > 0 && pkt.Size()-int(h.hdrLen) > mss {
		h.gsoType = typ
		h.gsoSize = uint16(mss)
		if t != nil && t.Flags()&header.TCPFlagCwr != 0 {
			h.gsoType |= virtioNetHdrGSOECN
		}
	}
	return h
}

// tcpHeaderOf returns pkt's TCP header: the parsed transport header of the
// stack's own packets, or the first bytes after the network header of a
// forwarded one (whose transport header the stack did not parse). It
// returns nil when there is no well-formed one.
func tcpHeaderOf(pkt *stack.PacketBuffer) header.TCP {
	b := pkt.TransportHeader().Slice()
	if len(b) < header.TCPMinimumSize {
		var ok bool
		if b, ok = pkt.Data().PullUp(header.TCPMinimumSize); !ok {
			return nil
		}
	}
	t := header.TCP(b)
	if off := int(t.DataOffset()); off < header.TCPMinimumSize || off > header.TCPHeaderMaximumSize {
		return nil
	}
	return t
}
