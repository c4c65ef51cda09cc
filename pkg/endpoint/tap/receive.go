//go:build linux

package tap

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// maxConsecutiveReadErrors is how many unexpected read errors in a row the
// reader tolerates before it treats the device as gone.
const maxConsecutiveReadErrors = 16

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
	rd, err := newTAPReader(e.file, e.poll)
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
				// A device being deleted can report "not pollable"
				// before the kernel answers EBADFD: give it a moment
				// (1 ms doubling to 16, about 200 ms over the tries).
				time.Sleep(time.Millisecond << min(errorsInRow-1, 4))
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
	f, h, ok := passGSORead(b, e.framing == endpoint.Ethernet)
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
