// Package tcpipx converts between net/netip and gVisor's tcpip types.
package tcpipx

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// ProtocolOf returns a's network protocol, IPv4 or IPv6.
func ProtocolOf(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return header.IPv4ProtocolNumber
	}
	return header.IPv6ProtocolNumber
}
