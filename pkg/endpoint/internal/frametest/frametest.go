// Package frametest builds the TCP frames the endpoint tests feed to
// segmentation and reads back what comes out, checking every length and
// checksum.
package frametest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// The addresses of the frames TCPFrame.Build makes.
var (
	SrcMAC = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x01")
	DstMAC = tcpip.LinkAddress("\x02\x00\x00\x00\x00\x02")
	Src4   = tcpip.AddrFrom4([4]byte{10, 0, 0, 1})
	Dst4   = tcpip.AddrFrom4([4]byte{10, 0, 0, 2})
	Src6   = tcpip.AddrFrom16([16]byte{0xfd, 0, 15: 1})
	Dst6   = tcpip.AddrFrom16([16]byte{0xfd, 0, 15: 2})
)

// TCPFrame describes a TCP packet for the tests to build, the way the
// kernel hands it over: a pseudo-header sum in the TCP checksum field
// (CHECKSUM_PARTIAL) unless FullCsum.
type TCPFrame struct {
	V6, Ethernet bool
	IPOpts       int // IPv4 option bytes (NOPs), a multiple of 4
	TCPOpts      int // TCP option bytes (NOPs), a multiple of 4
	Flags        header.TCPFlags
	Seq          uint32
	ID           uint16
	Payload      []byte
	Pad          int // bytes after the IP packet (Ethernet padding)
	FullCsum     bool
}

// Build returns the frame and the length of its headers.
func (f TCPFrame) Build() ([]byte, int) {
	l2 := 0
	if f.Ethernet {
		l2 = header.EthernetMinimumSize
	}
	l3 := header.IPv4MinimumSize + f.IPOpts
	if f.V6 {
		l3 = header.IPv6MinimumSize
	}
	l4 := header.TCPMinimumSize + f.TCPOpts
	hdrLen := l2 + l3 + l4
	b := make([]byte, hdrLen+len(f.Payload)+f.Pad)
	copy(b[hdrLen:], f.Payload)
	src, dst := Src4, Dst4
	proto := header.IPv4ProtocolNumber
	if f.V6 {
		src, dst = Src6, Dst6
		proto = header.IPv6ProtocolNumber
	}
	if f.Ethernet {
		header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: SrcMAC, DstAddr: DstMAC, Type: proto})
	}
	tcpLen := l4 + len(f.Payload)
	if f.V6 {
		header.IPv6(b[l2:]).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(tcpLen),
			TransportProtocol: header.TCPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	} else {
		ip := header.IPv4(b[l2:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(l3 + tcpLen),
			ID:          f.ID,
			Flags:       header.IPv4FlagDontFragment,
			TTL:         64,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip[0] = byte(header.IPv4Version<<4 | l3/4)
		for i := header.IPv4MinimumSize; i < l3; i++ {
			ip[i] = 1 // NOP
		}
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l2+l3:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    40000,
		DstPort:    5201,
		SeqNum:     f.Seq,
		AckNum:     7,
		DataOffset: uint8(l4),
		Flags:      f.Flags,
		WindowSize: 1000,
	})
	for i := header.TCPMinimumSize; i < l4; i++ {
		tcp[i] = 1 // NOP
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen))
	if f.FullCsum {
		xsum = checksum.Checksum(f.Payload, xsum)
		tcp.SetChecksum(^tcp.CalculateChecksum(xsum))
	} else {
		tcp.SetChecksum(xsum)
	}
	return b, hdrLen
}

// TCPSegment is what ParseSegment reads back from an emitted TCP frame.
type TCPSegment struct {
	Seq     uint32
	Flags   header.TCPFlags
	ID      uint16
	Payload []byte
}

// ParseSegment parses a frame emitted by splitFrame and checks that its
// lengths and IP and TCP checksums are valid.
func ParseSegment(b []byte, v6, ethernet bool) (TCPSegment, error) {
	if ethernet {
		if len(b) < header.EthernetMinimumSize {
			return TCPSegment{}, errors.New("short ethernet frame")
		}
		b = b[header.EthernetMinimumSize:]
	}
	var src, dst tcpip.Address
	var tcpBytes []byte
	var id uint16
	if v6 {
		ip := header.IPv6(b)
		if !ip.IsValid(len(b)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(b) {
			return TCPSegment{}, fmt.Errorf("bad IPv6 header or length %d for %d bytes", ip.PayloadLength(), len(b))
		}
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		tcpBytes = ip.Payload()
	} else {
		ip := header.IPv4(b)
		if !ip.IsValid(len(b)) || int(ip.TotalLength()) != len(b) {
			return TCPSegment{}, fmt.Errorf("bad IPv4 header or total length for %d bytes", len(b))
		}
		if !ip.IsChecksumValid() {
			return TCPSegment{}, errors.New("bad IPv4 header checksum")
		}
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		tcpBytes = b[ip.HeaderLength():]
		id = ip.ID()
	}
	if len(tcpBytes) < header.TCPMinimumSize {
		return TCPSegment{}, errors.New("short TCP header")
	}
	tcp := header.TCP(tcpBytes)
	off := int(tcp.DataOffset())
	if off < header.TCPMinimumSize || off > len(tcpBytes) {
		return TCPSegment{}, errors.New("bad TCP data offset")
	}
	payload := tcpBytes[off:]
	if !tcp.IsChecksumValid(src, dst, checksum.Checksum(payload, 0), uint16(len(payload))) {
		return TCPSegment{}, errors.New("bad TCP checksum")
	}
	return TCPSegment{
		Seq:     tcp.SequenceNumber(),
		Flags:   tcp.Flags(),
		ID:      id,
		Payload: bytes.Clone(payload),
	}, nil
}

// RandomBytes returns n pseudo-random bytes from a fixed seed.
func RandomBytes(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{1}).Read(b)
	return b
}
