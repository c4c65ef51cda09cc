package tcpipx

import (
	"bytes"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestIPPacket(t *testing.T) {
	payload := []byte("payload")
	for _, tc := range []struct{ src, dst string }{{"10.0.0.1", "10.0.0.2"}, {"fd00::1", "fe80::1"}} {
		src, dst := netip.MustParseAddr(tc.src), netip.MustParseAddr(tc.dst)
		b := IPPacket(src, dst, header.UDPProtocolNumber, 17, payload)
		var (
			got        header.Network
			hops       uint8
			proto      uint8
			payloadGot []byte
		)
		if src.Is4() {
			ip := header.IPv4(b)
			if !ip.IsValid(len(b)) || !ip.IsChecksumValid() {
				t.Fatalf("%s: invalid IPv4 header or checksum: % x", tc.src, b)
			}
			got, hops, proto, payloadGot = ip, ip.TTL(), ip.Protocol(), ip.Payload()
		} else {
			ip := header.IPv6(b)
			if !ip.IsValid(len(b)) {
				t.Fatalf("%s: invalid IPv6 header: % x", tc.src, b)
			}
			got, hops, proto, payloadGot = ip, ip.HopLimit(), ip.NextHeader(), ip.Payload()
		}
		if got.SourceAddress().String() != tc.src || got.DestinationAddress().String() != tc.dst {
			t.Errorf("%s: addresses %s -> %s", tc.src, got.SourceAddress(), got.DestinationAddress())
		}
		if hops != 17 || proto != uint8(header.UDPProtocolNumber) || !bytes.Equal(payloadGot, payload) {
			t.Errorf("%s: hop limit %d, protocol %d, payload %q", tc.src, hops, proto, payloadGot)
		}
	}
}
