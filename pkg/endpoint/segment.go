package endpoint

import (
	"errors"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Software segmentation of TCP super-packets: what a link that takes no GSO
// does with one (SoftwareGSO), and what the TAP endpoint does with the
// super-packets its kernel hands over (SegmentTCP). It works on plain byte
// slices and never reads or writes outside the frame it is given.

// ErrBadGSOFrame is the reason a TCP super-packet is refused: its headers do
// not parse as one unfragmented TCP packet.
var ErrBadGSOFrame = errors.New("malformed TCP GSO frame")

// MaxGSOHeaderLen bounds the headers copied in front of every segment:
// Ethernet (14) + IPv4 with options (60) + TCP with options (60) = 134 bytes;
// IPv6 without extension headers is 40 < 60.
const MaxGSOHeaderLen = header.EthernetMinimumSize + header.IPv4MaximumHeaderSize + header.TCPHeaderMaximumSize

// ParsedTCP is a frame holding one TCP packet whose headers ParseTCPFrame
// checked: Frame[:L2] is the Ethernet header (L2 is 0 on a TUN device),
// then L3 bytes of IP header, L4 bytes of TCP header and the payload up to
// the IP packet's end.
type ParsedTCP struct {
	Frame      []byte
	L2, L3, L4 int
	V6         bool
}

// HeaderLength is the length of the frame's headers.
func (f *ParsedTCP) HeaderLength() int { return f.L2 + f.L3 + f.L4 }

// ParseTCPFrame checks that frame holds a TCP packet over IPv4 (v6 false)
// or IPv6 without extension headers, unfragmented, and returns it trimmed to
// the IP packet's length (link-layer padding removed). It never reads
// outside frame.
func ParseTCPFrame(frame []byte, ethernet, v6 bool) (ParsedTCP, error) {
	f, n, err := ParseTCPHead(frame, len(frame), ethernet, v6)
	if err != nil {
		return ParsedTCP{}, err
	}
	f.Frame = frame[:n]
	return f, nil
}

// ParseTCPHead is ParseTCPFrame for a frame of size bytes of which only the
// head is at hand (the rest is data it does not read): the headers must be
// in head. It returns them (Frame is nil) and the frame's length without
// link-layer padding.
func ParseTCPHead(head []byte, size int, ethernet, v6 bool) (ParsedTCP, int, error) {
	if size < len(head) {
		return ParsedTCP{}, 0, ErrBadGSOFrame
	}
	l2 := 0
	if ethernet {
		if len(head) < header.EthernetMinimumSize {
			return ParsedTCP{}, 0, ErrBadGSOFrame
		}
		want := header.IPv4ProtocolNumber
		if v6 {
			want = header.IPv6ProtocolNumber
		}
		if header.Ethernet(head).Type() != want {
			return ParsedTCP{}, 0, ErrBadGSOFrame // VLAN tags included: not offered by tuntap.Open
		}
		l2 = header.EthernetMinimumSize
	}
	ip, ipSize := head[l2:], size-l2
	var l3, total int
	if v6 {
		if len(ip) < header.IPv6MinimumSize || header.IPVersion(ip) != header.IPv6Version {
			return ParsedTCP{}, 0, ErrBadGSOFrame
		}
		h := header.IPv6(ip)
		if h.NextHeader() != uint8(header.TCPProtocolNumber) {
			return ParsedTCP{}, 0, ErrBadGSOFrame // extension headers
		}
		l3 = header.IPv6MinimumSize
		total = l3 + int(h.PayloadLength())
		if total > ipSize {
			return ParsedTCP{}, 0, ErrBadGSOFrame
		}
	} else {
		if len(ip) < header.IPv4MinimumSize || header.IPVersion(ip) != header.IPv4Version {
			return ParsedTCP{}, 0, ErrBadGSOFrame
		}
		h := header.IPv4(ip)
		l3 = int(h.HeaderLength())
		total = int(h.TotalLength())
		if l3 < header.IPv4MinimumSize || total < l3 || total > ipSize ||
			h.Protocol() != uint8(header.TCPProtocolNumber) ||
			h.Flags()&header.IPv4FlagMoreFragments != 0 || h.FragmentOffset() != 0 {
			return ParsedTCP{}, 0, ErrBadGSOFrame
		}
	}
	if total-l3 < header.TCPMinimumSize || len(ip) < l3+header.TCPMinimumSize {
		return ParsedTCP{}, 0, ErrBadGSOFrame
	}
	l4 := int(header.TCP(ip[l3:]).DataOffset())
	if l4 < header.TCPMinimumSize || l4 > total-l3 || l3+l4 > len(ip) {
		return ParsedTCP{}, 0, ErrBadGSOFrame
	}
	return ParsedTCP{L2: l2, L3: l3, L4: l4, V6: v6}, l2 + total, nil
}

// SegmentTCP cuts the TCP super-packet in frame into segments of gsoSize
// payload bytes, fixes their headers and checksums and emits them.
func SegmentTCP(frame []byte, ethernet, v6 bool, gsoSize int, emit func([]byte, bool)) error {
	if gsoSize <= 0 {
		return ErrBadGSOFrame
	}
	f, err := ParseTCPFrame(frame, ethernet, v6)
	if err != nil {
		return err
	}
	return segmentParsed(f, gsoSize, gsoSize, emit)
}

// SuperHeaders are what the headers of a TCP super-packet's pieces are
// made from: the super-packet's IPv4 ID, sequence number and flags, read
// once. A piece holds one segment or several whole ones; each gets headers
// as a kernel's segmentation makes them.
type SuperHeaders struct {
	l3    int
	v6    bool
	id    uint16
	seq   uint32
	flags uint8
}

// ReadSuperHeaders reads a TCP super-packet's headers: ip holds its IP
// header (l3 bytes: IPv6 without extension headers when v6) and its TCP
// header, which the caller checked.
func ReadSuperHeaders(ip []byte, l3 int, v6 bool) SuperHeaders {
	t := header.TCP(ip[l3:])
	s := SuperHeaders{l3: l3, v6: v6, seq: t.SequenceNumber(), flags: uint8(t.Flags())}
	if !v6 {
		s.id = header.IPv4(ip).ID()
	}
	return s
}

// Piece makes ip, a copy of the super-packet's IP and TCP headers, the
// headers of the piece that carries size bytes from off of its n bytes of
// payload, the super-packet being cut at mss: the IP length, the IPv4 ID
// (the super-packet's, plus one per segment before the piece) and header
// checksum, the sequence number, FIN and PSH on the last piece only and CWR
// on the first only. The TCP checksum is the caller's.
func (s *SuperHeaders) Piece(ip []byte, off, size, n, mss int) {
	l4 := int(header.TCP(ip[s.l3:]).DataOffset())
	if s.v6 {
		header.IPv6(ip).SetPayloadLength(uint16(l4 + size))
	} else {
		h := header.IPv4(ip)
		h.SetTotalLength(uint16(s.l3 + l4 + size))
		h.SetID(s.id + uint16(off/mss))
		h.SetChecksum(0)
		h.SetChecksum(^h.CalculateChecksum())
	}
	t := header.TCP(ip[s.l3:])
	t.SetSequenceNumber(s.seq + uint32(off))
	flags := s.flags
	if off+size < n {
		flags &^= uint8(header.TCPFlagFin | header.TCPFlagPsh)
	}
	if off != 0 {
		flags &^= uint8(header.TCPFlagCwr)
	}
	t.SetFlags(flags)
}

// segmentParsed is SegmentTCP on a parsed frame, its pieces gsoSize bytes
// of payload, whole segments of mss (the IPv4 IDs count those). Both must
// be positive.
func segmentParsed(f ParsedTCP, gsoSize, mss int, emit func([]byte, bool)) error {
	frame, l2, l3, l4, v6 := f.Frame, f.L2, f.L3, f.L4, f.V6
	hdrLen := f.HeaderLength()
	payloadLen := len(frame) - hdrLen

	// The headers of the super-packet, copied before the segments overwrite
	// them.
	var tmplArr [MaxGSOHeaderLen]byte
	tmpl := tmplArr[:hdrLen]
	copy(tmpl, frame)
	sh := ReadSuperHeaders(tmpl[l2:], l3, v6)
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
		sh.Piece(seg[l2:], start-hdrLen, end-start, payloadLen, mss)

		t := header.TCP(seg[l2+l3:])
		t.SetChecksum(0)
		// The TCP header length is a multiple of 4, so the payload starts
		// at an even offset and the sums can be chained.
		segLen := end - start + l4 // TCP header + payload
		xsum := checksum.Combine(pseudo, uint16(segLen))
		xsum = checksum.Checksum(t[:l4], xsum)
		xsum = checksum.Checksum(seg[hdrLen:], xsum)
		t.SetChecksum(^xsum)

		emit(seg, true)
	}
	return nil
}
