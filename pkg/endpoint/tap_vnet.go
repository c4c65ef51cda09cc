package endpoint

import (
	"encoding/binary"
	"errors"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// This file holds the virtio-net header (struct virtio_net_hdr in
// linux/virtio_net.h) that a TAP or TUN device opened with IFF_VNET_HDR puts
// in front of every frame, and the software segmentation of the TCP
// super-packets the kernel hands over when the device advertises TSO.
//
// Everything here works on plain byte slices and touches no file descriptor,
// so it is unit-tested and fuzzed without privileges.

// virtioNetHdrLen is sizeof(struct virtio_net_hdr), the size the devices
// are opened with (tuntap.VnetHdrLen). The 12-byte
// virtio_net_hdr_mrg_rxbuf variant is never configured.
const virtioNetHdrLen = tuntap.VnetHdrLen

// Flags and GSO types of struct virtio_net_hdr (linux/virtio_net.h).
const (
	virtioNetHdrFNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	virtioNetHdrFDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID

	virtioNetHdrGSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE
	virtioNetHdrGSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	virtioNetHdrGSOUDP   = 3    // VIRTIO_NET_HDR_GSO_UDP (UFO)
	virtioNetHdrGSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	virtioNetHdrGSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4 (USO)
	virtioNetHdrGSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN, or-ed into a TCP type
)

// virtioNetHdr is a decoded struct virtio_net_hdr. On the wire every
// multi-byte field is little endian (virtio 1.0; tuntap.Open sets TUNSETVNETLE so
// this holds on big-endian hosts too).
type virtioNetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16
	gsoSize    uint16
	csumStart  uint16
	csumOffset uint16
}

// decode reads h from the first virtioNetHdrLen bytes of b.
//
// Precondition: len(b) >= virtioNetHdrLen.
func (h *virtioNetHdr) decode(b []byte) {
	h.flags = b[0]
	h.gsoType = b[1]
	h.hdrLen = binary.LittleEndian.Uint16(b[2:])
	h.gsoSize = binary.LittleEndian.Uint16(b[4:])
	h.csumStart = binary.LittleEndian.Uint16(b[6:])
	h.csumOffset = binary.LittleEndian.Uint16(b[8:])
}

// encode writes h into b.
func (h *virtioNetHdr) encode(b *[virtioNetHdrLen]byte) {
	b[0] = h.flags
	b[1] = h.gsoType
	binary.LittleEndian.PutUint16(b[2:], h.hdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.gsoSize)
	binary.LittleEndian.PutUint16(b[6:], h.csumStart)
	binary.LittleEndian.PutUint16(b[8:], h.csumOffset)
}

// rxKind says what splitFrame did with a frame.
type rxKind int

const (
	// rxPlain: the frame is delivered as read; its checksums are whatever
	// the sender put there (the stack verifies them).
	rxPlain rxKind = iota
	// rxCsumCompleted: VIRTIO_NET_HDR_F_NEEDS_CSUM was set and the checksum
	// at csum_start+csum_offset was completed in software.
	rxCsumCompleted
	// rxSegmented: a TCP GSO super-packet was cut into segments carrying
	// freshly computed IP and TCP checksums.
	rxSegmented
)

// Reasons splitFrame drops a frame. They are internal: the endpoint counts
// them in Stats.RxDrops (and TAPOffloadStats.RxUnsupportedGSO).
var (
	errShortVnetHdr   = errors.New("frame shorter than the virtio-net header")
	errBadCsumOffsets = errors.New("csum_start/csum_offset outside the frame")
	errUnsupportedGSO = errors.New("unsupported GSO type")
	errBadGSOFrame    = errors.New("malformed TCP GSO frame")
)

// gsoMaxHeaderLen bounds the headers copied in front of every segment:
// Ethernet (14) + IPv4 with options (60) + TCP with options (60) = 134 bytes;
// IPv6 without extension headers is 40 < 60.
const gsoMaxHeaderLen = header.EthernetMinimumSize + header.IPv4MaximumHeaderSize + header.TCPHeaderMaximumSize

// splitFrame turns one read from the device into the frames to deliver and
// calls emit for each of them, in order. b holds the virtio-net header (when
// vnetHdr) followed by the frame, which starts with an Ethernet header when
// ethernet and with the IP header otherwise.
//
// validated tells emit whether the frame's IP and transport checksums were
// computed here from scratch (and so are known to be right). The slice passed
// to emit aliases b and is valid only during the call: splitFrame writes the
// segments of a super-packet in place, each over the tail of the one before.
//
// A super-packet of gso_size g with headers of h bytes is emitted as
// segments of at most h+g bytes, the last one shorter; IPv4 ids count up from
// the super-packet's, sequence numbers advance by g, FIN and PSH appear only
// on the last segment and CWR only on the first.
//
// splitFrame never reads or writes outside b, whatever b holds.
func splitFrame(b []byte, vnetHdr, ethernet bool, emit func(frame []byte, validated bool)) (rxKind, error) {
	if !vnetHdr {
		emit(b, false)
		return rxPlain, nil
	}
	if len(b) < virtioNetHdrLen {
		return rxPlain, errShortVnetHdr
	}
	var h virtioNetHdr
	h.decode(b)
	frame := b[virtioNetHdrLen:]

	switch h.gsoType &^ virtioNetHdrGSOECN {
	case virtioNetHdrGSONone:
		if h.flags&virtioNetHdrFNeedsCsum == 0 {
			emit(frame, false)
			return rxPlain, nil
		}
		if err := completeChecksum(frame, int(h.csumStart), int(h.csumOffset)); err != nil {
			return rxPlain, err
		}
		emit(frame, false)
		return rxCsumCompleted, nil
	case virtioNetHdrGSOTCPv4:
		return rxSegmented, segmentTCP(frame, ethernet, false, int(h.gsoSize), emit)
	case virtioNetHdrGSOTCPv6:
		return rxSegmented, segmentTCP(frame, ethernet, true, int(h.gsoSize), emit)
	default:
		// UFO, USO and anything newer: tuntap.Open never advertises them, so
		// the kernel does not send them.
		return rxPlain, errUnsupportedGSO
	}
}

// completeChecksum does what the kernel's skb_checksum_help does for a
// CHECKSUM_PARTIAL packet: it sums frame[start:] (whose checksum field holds
// the pseudo-header sum) and stores the complement at start+offset.
func completeChecksum(frame []byte, start, offset int) error {
	field := start + offset
	if field+checksum.Size > len(frame) {
		return errBadCsumOffsets
	}
	xsum := ^checksum.Checksum(frame[start:], 0)
	if xsum == 0 {
		// A zero UDP checksum means "none"; 0xffff is the same value in
		// ones' complement (CSUM_MANGLED_0).
		xsum = 0xffff
	}
	checksum.Put(frame[field:], xsum)
	return nil
}

// parsedTCP is a frame holding one TCP packet whose headers parseTCPFrame
// checked: frame[:l2] is the Ethernet header (l2 is 0 on a TUN device),
// then l3 bytes of IP header, l4 bytes of TCP header and the payload up to
// the IP packet's end.
type parsedTCP struct {
	frame      []byte
	l2, l3, l4 int
	v6         bool
}

// hdrLen is the length of the frame's headers.
func (f *parsedTCP) hdrLen() int { return f.l2 + f.l3 + f.l4 }

// parseTCPFrame checks that frame holds a TCP packet over IPv4 (v6 false)
// or IPv6 without extension headers, unfragmented, and returns it trimmed to
// the IP packet's length (link-layer padding removed). It never reads
// outside frame.
func parseTCPFrame(frame []byte, ethernet, v6 bool) (parsedTCP, error) {
	l2 := 0
	if ethernet {
		if len(frame) < header.EthernetMinimumSize {
			return parsedTCP{}, errBadGSOFrame
		}
		want := header.IPv4ProtocolNumber
		if v6 {
			want = header.IPv6ProtocolNumber
		}
		if header.Ethernet(frame).Type() != want {
			return parsedTCP{}, errBadGSOFrame // VLAN tags included: not offered by tuntap.Open
		}
		l2 = header.EthernetMinimumSize
	}
	ip := frame[l2:]
	var l3 int
	if v6 {
		if len(ip) < header.IPv6MinimumSize || header.IPVersion(ip) != header.IPv6Version {
			return parsedTCP{}, errBadGSOFrame
		}
		h := header.IPv6(ip)
		if h.NextHeader() != uint8(header.TCPProtocolNumber) {
			return parsedTCP{}, errBadGSOFrame // extension headers
		}
		l3 = header.IPv6MinimumSize
		total := l3 + int(h.PayloadLength())
		if total > len(ip) {
			return parsedTCP{}, errBadGSOFrame
		}
		ip = ip[:total]
	} else {
		if len(ip) < header.IPv4MinimumSize || header.IPVersion(ip) != header.IPv4Version {
			return parsedTCP{}, errBadGSOFrame
		}
		h := header.IPv4(ip)
		l3 = int(h.HeaderLength())
		total := int(h.TotalLength())
		if l3 < header.IPv4MinimumSize || total < l3 || total > len(ip) ||
			h.Protocol() != uint8(header.TCPProtocolNumber) ||
			h.Flags()&header.IPv4FlagMoreFragments != 0 || h.FragmentOffset() != 0 {
			return parsedTCP{}, errBadGSOFrame
		}
		ip = ip[:total]
	}
	tcp := ip[l3:]
	if len(tcp) < header.TCPMinimumSize {
		return parsedTCP{}, errBadGSOFrame
	}
	l4 := int(header.TCP(tcp).DataOffset())
	if l4 < header.TCPMinimumSize || l4 > len(tcp) {
		return parsedTCP{}, errBadGSOFrame
	}
	return parsedTCP{frame: frame[:l2+len(ip)], l2: l2, l3: l3, l4: l4, v6: v6}, nil
}

// segmentTCP cuts the TCP super-packet in frame into segments of gsoSize
// payload bytes, fixes their headers and checksums and emits them.
func segmentTCP(frame []byte, ethernet, v6 bool, gsoSize int, emit func([]byte, bool)) error {
	if gsoSize <= 0 {
		return errBadGSOFrame
	}
	f, err := parseTCPFrame(frame, ethernet, v6)
	if err != nil {
		return err
	}
	return segmentParsed(f, gsoSize, emit)
}

// segmentParsed is segmentTCP on a parsed frame. gsoSize must be positive.
func segmentParsed(f parsedTCP, gsoSize int, emit func([]byte, bool)) error {
	frame, l2, l3, l4, v6 := f.frame, f.l2, f.l3, f.l4, f.v6
	hdrLen := f.hdrLen()
	payloadLen := len(frame) - hdrLen

	// The headers of the super-packet, copied before the segments overwrite
	// them.
	var tmplArr [gsoMaxHeaderLen]byte
	tmpl := tmplArr[:hdrLen]
	copy(tmpl, frame)
	tmplTCP := header.TCP(tmpl[l2+l3:])
	seq0 := tmplTCP.SequenceNumber()
	flags0 := uint8(tmplTCP.Flags())
	var id0 uint16
	if !v6 {
		id0 = header.IPv4(tmpl[l2:]).ID()
	}
	// Pseudo-header sum without the length: source and destination
	// addresses (adjacent in both IPv4 and IPv6 headers) and the protocol.
	var addrs []byte
	if v6 {
		addrs = tmpl[l2+8 : l2+header.IPv6MinimumSize]
	} else {
		addrs = tmpl[l2+12 : l2+header.IPv4MinimumSize]
	}
	pseudo := checksum.Combine(checksum.Checksum(addrs, 0), uint16(header.TCPProtocolNumber))

	nseg := (payloadLen + gsoSize - 1) / gsoSize
	if nseg == 0 {
		nseg = 1 // a bare header: deliver it with fixed checksums
	}
	for i := 0; i < nseg; i++ {
		start := hdrLen + i*gsoSize // payload offset of segment i in frame
		end := min(start+gsoSize, len(frame))
		seg := frame[start-hdrLen : end]
		copy(seg, tmpl)
		segLen := end - start + l4 // TCP header + payload

		if v6 {
			header.IPv6(seg[l2:]).SetPayloadLength(uint16(segLen))
		} else {
			h := header.IPv4(seg[l2:])
			h.SetTotalLength(uint16(l3 + segLen))
			h.SetID(id0 + uint16(i))
			h.SetChecksum(0)
			h.SetChecksum(^h.CalculateChecksum())
		}

		t := header.TCP(seg[l2+l3:])
		t.SetSequenceNumber(seq0 + uint32(i*gsoSize))
		flags := flags0
		if i != nseg-1 {
			flags &^= uint8(header.TCPFlagFin | header.TCPFlagPsh)
		}
		if i != 0 {
			flags &^= uint8(header.TCPFlagCwr)
		}
		t.SetFlags(flags)
		t.SetChecksum(0)
		// The TCP header length is a multiple of 4, so the payload starts
		// at an even offset and the sums can be chained.
		xsum := checksum.Combine(pseudo, uint16(segLen))
		xsum = checksum.Checksum(t[:l4], xsum)
		xsum = checksum.Checksum(seg[hdrLen:], xsum)
		t.SetChecksum(^xsum)

		emit(seg, true)
	}
	return nil
}
