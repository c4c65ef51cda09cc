// Package tcpipx converts between net/netip and gVisor's tcpip types, and
// builds IP packets for tests.
package tcpipx

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Addr returns a as gVisor's address: 4 bytes for IPv4, 16 for IPv6.
func Addr(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.AsSlice()) }

// ProtocolOf returns a's network protocol, IPv4 or IPv6.
func ProtocolOf(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return header.IPv4ProtocolNumber
	}
	return header.IPv6ProtocolNumber
}

// IPPacket builds an IP packet from src to dst carrying payload as proto,
// with hopLimit as its TTL or hop limit: IPv4, its header checksum set, when
// src is an IPv4 address, IPv6 otherwise. For tests and test programs.
func IPPacket(src, dst netip.Addr, proto tcpip.TransportProtocolNumber, hopLimit uint8, payload []byte) []byte {
	s, d := Addr(src), Addr(dst)
	if src.Is4() {
		b := make([]byte, header.IPv4MinimumSize+len(payload))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)), TTL: hopLimit, Protocol: uint8(proto),
			SrcAddr: s, DstAddr: d,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(b[header.IPv4MinimumSize:], payload)
		return b
	}
	b := make([]byte, header.IPv6MinimumSize+len(payload))
	header.IPv6(b).Encode(&header.IPv6Fields{
		PayloadLength: uint16(len(payload)), TransportProtocol: proto, HopLimit: hopLimit,
		SrcAddr: s, DstAddr: d,
	})
	copy(b[header.IPv6MinimumSize:], payload)
	return b
}
