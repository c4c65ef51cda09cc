//go:build linux

package tap

import (
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

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
	var partsArr [txIovecs][]byte
	parts, size := partsArr[:0], 0
	if views, _ := pkt.AsViewList(); n+views.Len() > len(iovArr) {
		// More pieces than iovecs on the stack: write a flat copy.
		e.offload.TxFlattened.Add(1)
		flat := pkt.ToView()
		defer flat.Release()
		if s := flat.AsSlice(); len(s) > 0 {
			parts, size = append(parts, s), len(s)
		}
	} else {
		parts, size = endpoint.AppendSlices(parts, pkt)
	}
	for _, s := range parts {
		iovArr[n] = unix.Iovec{Base: &s[0]}
		iovArr[n].SetLen(len(s))
		n++
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
	switch pkt.GSOOptions.Type {
	case stack.GSOTCPv4, stack.GSOTCPv6:
	default:
		return virtioNetHdr{}
	}
	return e.gsoVnetHdr(&pkt.GSOOptions, len(pkt.NetworkHeader().Slice()), tcpHeaderOf(pkt), pkt.Size())
}

// gsoVnetHdr is txVnetHdr for a TCP packet of size bytes with GSO options
// opts, l3 bytes of IP header and TCP header t (nil if malformed).
func (e *Endpoint) gsoVnetHdr(opts *stack.GSO, l3 int, t header.TCP, size int) virtioNetHdr {
	var h virtioNetHdr
	typ := uint8(virtioNetHdrGSOTCPv4)
	if opts.Type == stack.GSOTCPv6 {
		typ = virtioNetHdrGSOTCPv6
	}
	l2 := int(e.framing.HeaderLength())
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
	if mss > 0 && size-int(h.hdrLen) > mss {
		h.gsoType = typ
		h.gsoSize = uint16(mss)
		if t != nil && t.Flags()&header.TCPFlagCwr != 0 {
			h.gsoType |= virtioNetHdrGSOECN
		}
	}
	return h
}

// WriteFrame writes one frame made of parts (total bytes: the link's
// framing, then an IP packet, with every header in parts[0]) with one
// writev, the kernel copying parts once: with gso, a TCP packet whose
// checksum the kernel completes and which it segments where larger than
// the MSS. It reports false, having written nothing, when the device does
// not take the frame as it is (no virtio-net header for a gso packet, too
// many parts): the caller then writes the packet the usual way. A device
// that refuses it drops it and counts it, as WritePackets does.
func (e *Endpoint) WriteFrame(parts [][]byte, total int, gso *stack.GSO) bool {
	var h virtioNetHdr
	switch gso.Type {
	case stack.GSONone:
	case stack.GSOTCPv4, stack.GSOTCPv6:
		l2, l3 := int(e.framing.HeaderLength()), int(gso.L3HdrLen)
		if !e.vnetHdr || len(parts) == 0 || len(parts[0]) < l2+l3+header.TCPMinimumSize {
			return false
		}
		t := header.TCP(parts[0][l2+l3:])
		if off := int(t.DataOffset()); off < header.TCPMinimumSize || l2+l3+off > len(parts[0]) {
			return false
		}
		h = e.gsoVnetHdr(gso, l3, t, total)
	default:
		return false
	}
	if len(parts)+1 > txIovecs || total <= 0 {
		return false
	}
	e.fdMu.RLock()
	defer e.fdMu.RUnlock()
	if e.fdClosed {
		e.stats.TxDrops.Add(1)
		return true
	}
	var vnetBuf [virtioNetHdrLen]byte
	var iovArr [txIovecs]unix.Iovec
	n := 0
	if e.vnetHdr {
		h.encode(&vnetBuf)
		iovArr[n] = unix.Iovec{Base: &vnetBuf[0]}
		iovArr[n].SetLen(virtioNetHdrLen)
		n++
	}
	for _, s := range parts {
		if len(s) == 0 {
			continue
		}
		iovArr[n] = unix.Iovec{Base: &s[0]}
		iovArr[n].SetLen(len(s))
		n++
	}
	if e.writeIovecsLocked(iovArr[:n], total) {
		e.stats.TxOneCopy.Add(1)
		if h.gsoType != virtioNetHdrGSONone {
			e.offload.TxGSOPackets.Add(1)
		}
	}
	return true
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
