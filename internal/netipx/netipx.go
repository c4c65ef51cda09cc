// Package netipx holds net/netip helpers the standard library lacks.
package netipx

import "net/netip"

// LastAddr returns the highest address in p: its IPv4 broadcast address,
// for example 10.244.1.255 for 10.244.1.0/24.
func LastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
