//go:build linux

package tap

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

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
	// (pkg/endpoint/gso.go), instead of segmenting them. Not for a stack
	// with transport endpoints of its own: their checksums would be left
	// to a device that does not compute them.
	Forwarding bool
	// RxLimit bounds what the pod behind the device can make this endpoint
	// read (see endpoint.RxLimit; a super-packet is one frame); the zero
	// value limits nothing. Beyond it the kernel's queue for the device
	// fills and the kernel drops.
	RxLimit endpoint.RxLimit
	// Poll is the longest the reader polls the device after finding it
	// empty before it parks on the runtime's poller (endpoint.Poll: how
	// long within that follows the gaps between the link's frames). Zero
	// means endpoint.DefaultPollMax; negative means never poll.
	Poll time.Duration
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
	poll       time.Duration

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
		poll:       opts.Poll,
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
