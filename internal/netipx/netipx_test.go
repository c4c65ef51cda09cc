package netipx

import (
	"net/netip"
	"testing"
)

// TestLastAddr: every host bit set, in both families, for any length.
func TestLastAddr(t *testing.T) {
	for _, tc := range []struct{ prefix, want string }{
		{"10.244.1.0/24", "10.244.1.255"},
		{"10.0.0.0/8", "10.255.255.255"},
		{"10.0.0.4/30", "10.0.0.7"},
		{"10.0.0.1/32", "10.0.0.1"},
		{"0.0.0.0/0", "255.255.255.255"},
		{"2001:db8:1::/64", "2001:db8:1:0:ffff:ffff:ffff:ffff"},
		{"2001:db8::/127", "2001:db8::1"},
	} {
		if got := LastAddr(netip.MustParsePrefix(tc.prefix)); got != netip.MustParseAddr(tc.want) {
			t.Errorf("LastAddr(%s) = %s, want %s", tc.prefix, got, tc.want)
		}
	}
}
