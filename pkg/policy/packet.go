package policy

import (
	"encoding/binary"
	"net/netip"
)

// Tuple is a packet's flow: addresses, protocol and ports. ICMP echo
// carries its identifier as a port: a request's source port, a reply's
// destination port (so a reply is the request's tuple reversed).
type Tuple struct {
	Src, Dst         netip.Addr
	SrcPort, DstPort uint16
	Proto            uint8
}

func (t Tuple) reverse() Tuple {
	return Tuple{Src: t.Dst, Dst: t.Src, SrcPort: t.DstPort, DstPort: t.SrcPort, Proto: t.Proto}
}

// Flow is what the enforcer reads from one IP packet.
type Flow struct {
	Tuple
	// Ports says the packet carries ports a policy matches on (TCP, UDP
	// or SCTP, not a later fragment).
	Ports bool
	// TCPFlags are a TCP segment's flags.
	TCPFlags uint8
	// Echo says the packet is an ICMP echo request or reply (tracked).
	Echo bool
	// Error says the packet is an ICMP error about Inner, a packet of a
	// flow between the same hosts, sent the other way.
	Error bool
	Inner Tuple
	// frag says the packet is a fragment (frag.go): fragFirst, the
	// first of a datagram with more to come, or fragLater, one without
	// the transport header; fragID is the datagram's IP identification.
	frag   uint8
	fragID uint32
}

// Flow.frag values.
const (
	fragNone uint8 = iota
	fragFirst
	fragLater
)

// TCP flags.
const (
	tcpFin = 0x01
	tcpSyn = 0x02
	tcpRst = 0x04
	tcpAck = 0x10
)

// maxHeaderWalk bounds the IPv6 extension headers ParseFlow walks.
const maxHeaderWalk = 256

// ParseFlow reads the flow of ip, an IPv4 or IPv6 packet's first bytes
// (at least its headers; 128 bytes hold those of an ICMP error too). It
// reports false for what it cannot read; the caller decides (the router
// lets gVisor drop it as malformed).
func ParseFlow(ip []byte) (Flow, bool) {
	return parse(ip, true)
}

func parse(ip []byte, outer bool) (Flow, bool) {
	var f Flow
	if len(ip) < 1 {
		return f, false
	}
	var l4 []byte
	first := true
	switch ip[0] >> 4 {
	case 4:
		if len(ip) < 20 {
			return f, false
		}
		hl := int(ip[0]&0xf) * 4
		if hl < 20 || len(ip) < hl {
			return f, false
		}
		f.Src = netip.AddrFrom4([4]byte(ip[12:16]))
		f.Dst = netip.AddrFrom4([4]byte(ip[16:20]))
		f.Proto = ip[9]
		ff := binary.BigEndian.Uint16(ip[6:8])
		first = ff&0x1fff == 0
		if more := ff&0x2000 != 0; more || !first {
			f.frag, f.fragID = fragFirst, uint32(binary.BigEndian.Uint16(ip[4:6]))
		}
		l4 = ip[hl:]
	case 6:
		if len(ip) < 40 {
			return f, false
		}
		f.Src = netip.AddrFrom16([16]byte(ip[8:24]))
		f.Dst = netip.AddrFrom16([16]byte(ip[24:40]))
		next, off := ip[6], 40
	walk:
		for {
			switch next {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if len(ip) < off+2 {
					return f, false
				}
				next, off = ip[off], off+(int(ip[off+1])+1)*8
			case 44: // fragment
				if len(ip) < off+8 {
					return f, false
				}
				first = binary.BigEndian.Uint16(ip[off+2:])&^7 == 0
				if more := ip[off+3]&1 != 0; more || !first {
					f.frag, f.fragID = fragFirst, binary.BigEndian.Uint32(ip[off+4:])
				}
				next, off = ip[off], off+8
			default:
				break walk
			}
			if off > maxHeaderWalk {
				return f, false
			}
		}
		f.Proto = next
		if off > len(ip) {
			if outer {
				return f, false
			}
			off = len(ip)
		}
		l4 = ip[off:]
	default:
		return f, false
	}
	if !first {
		f.frag = fragLater
		return f, true // no transport header: matched without ports
	}
	switch f.Proto {
	case ProtoTCP, ProtoUDP, ProtoSCTP:
		if len(l4) < 4 {
			return f, !outer
		}
		f.SrcPort = binary.BigEndian.Uint16(l4[0:2])
		f.DstPort = binary.BigEndian.Uint16(l4[2:4])
		f.Ports = true
		if f.Proto == ProtoTCP && len(l4) >= 14 {
			f.TCPFlags = l4[13]
		}
	case ProtoICMP, ProtoICMPv6:
		if len(l4) < 8 || !outer {
			return f, !outer || len(l4) >= 4
		}
		typ := l4[0]
		id := binary.BigEndian.Uint16(l4[4:6])
		v6 := f.Proto == ProtoICMPv6
		switch {
		case (!v6 && typ == 8) || (v6 && typ == 128): // echo request
			f.Echo, f.SrcPort = true, id
		case (!v6 && typ == 0) || (v6 && typ == 129): // echo reply
			f.Echo, f.DstPort = true, id
		case (!v6 && (typ == 3 || typ == 11 || typ == 12)) || (v6 && typ >= 1 && typ <= 4):
			inner, ok := parse(l4[8:], false)
			if !ok || inner.Src.Is4() != f.Src.Is4() {
				return f, true // an error about nothing we know: untracked
			}
			f.Error, f.Inner = true, inner.Tuple
			if inner.Proto == ProtoICMP || inner.Proto == ProtoICMPv6 {
				// Quoted echo: its identifier as the tracker keys it.
				q := l4[8:]
				hl := 40
				if !v6 {
					hl = int(q[0]&0xf) * 4
				}
				if len(q) >= hl+6 {
					iid := binary.BigEndian.Uint16(q[hl+4 : hl+6])
					switch q[hl] {
					case 8, 128:
						f.Inner.SrcPort = iid
					case 0, 129:
						f.Inner.DstPort = iid
					}
				}
			}
		}
	}
	return f, true
}
