package tap

import (
	"encoding/binary"
	"errors"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
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
// them in Stats.RxDrops (and OffloadStats.RxUnsupportedGSO).
var (
	errShortVnetHdr   = errors.New("frame shorter than the virtio-net header")
	errBadCsumOffsets = errors.New("csum_start/csum_offset outside the frame")
	errUnsupportedGSO = errors.New("unsupported GSO type")
)

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
		return rxSegmented, endpoint.SegmentTCP(frame, ethernet, false, int(h.gsoSize), emit)
	case virtioNetHdrGSOTCPv6:
		return rxSegmented, endpoint.SegmentTCP(frame, ethernet, true, int(h.gsoSize), emit)
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

// passGSOFrame checks a TCP GSO frame read from the device for delivery as
// one packet: the headers parse, the kernel asked for the checksum to be
// completed exactly in the TCP checksum field, and there is a segment size.
// It returns the frame trimmed to its IP packet. Anything else goes through
// splitFrame, which segments or drops it.
func passGSOFrame(frame []byte, ethernet, v6 bool, h *virtioNetHdr) (endpoint.ParsedTCP, bool) {
	if h.flags&virtioNetHdrFNeedsCsum == 0 || h.gsoSize == 0 {
		return endpoint.ParsedTCP{}, false
	}
	f, err := endpoint.ParseTCPFrame(frame, ethernet, v6)
	if err != nil {
		return endpoint.ParsedTCP{}, false
	}
	if int(h.csumStart) != f.L2+f.L3 || h.csumOffset != header.TCPChecksumOffset {
		return endpoint.ParsedTCP{}, false
	}
	return f, true
}

// passGSORead checks a read from the device, virtio-net header and frame,
// for delivery whole to a forwarding stack: a TCP super-packet over IPv4 or
// IPv6 that passGSOFrame accepts. It returns the frame trimmed to its IP
// packet and the header.
func passGSORead(b []byte, ethernet bool) (endpoint.ParsedTCP, virtioNetHdr, bool) {
	var h virtioNetHdr
	if len(b) < virtioNetHdrLen {
		return endpoint.ParsedTCP{}, h, false
	}
	h.decode(b)
	var v6 bool
	switch h.gsoType &^ virtioNetHdrGSOECN {
	case virtioNetHdrGSOTCPv4:
	case virtioNetHdrGSOTCPv6:
		v6 = true
	default:
		return endpoint.ParsedTCP{}, h, false
	}
	f, ok := passGSOFrame(b[virtioNetHdrLen:], ethernet, v6, &h)
	return f, h, ok
}
