package ipam

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func prefixes(t testing.TB, ss ...string) []netip.Prefix {
	t.Helper()
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

// TestReservedAddresses allocates every address of small ranges (or the first
// few of large ones) and checks exactly which addresses come out, in which
// order, which gateway is reserved, and that tiny ranges are rejected.
func TestReservedAddresses(t *testing.T) {
	tests := []struct {
		name    string
		ranges  []string
		wantErr string     // Open must fail with this text
		wantGW  []string   // Gateways()
		want    [][]string // successive Allocate results
		// exhausted: after want, the next Allocate fails with ErrExhausted.
		exhausted bool
	}{
		{
			name: "v4 /30 has one pod address", ranges: []string{"10.0.0.0/30"},
			wantGW: []string{"10.0.0.1"}, want: [][]string{{"10.0.0.2"}}, exhausted: true,
		},
		{
			name: "v4 /29 skips network, gateway and broadcast", ranges: []string{"10.0.0.8/29"},
			wantGW: []string{"10.0.0.9"},
			want:   [][]string{{"10.0.0.10"}, {"10.0.0.11"}, {"10.0.0.12"}, {"10.0.0.13"}, {"10.0.0.14"}}, exhausted: true,
		},
		{name: "v4 /31 rejected", ranges: []string{"10.0.0.0/31"}, wantErr: "10.0.0.0/31: too small"},
		{name: "v4 /32 rejected", ranges: []string{"10.0.0.5/32"}, wantErr: "10.0.0.5/32: too small"},
		{
			name: "v6 /126 hands out the last address (no broadcast)", ranges: []string{"fd00::/126"},
			wantGW: []string{"fd00::1"}, want: [][]string{{"fd00::2"}, {"fd00::3"}}, exhausted: true,
		},
		{name: "v6 /127 rejected", ranges: []string{"fd00::/127"}, wantErr: "fd00::/127: too small"},
		{name: "v6 /128 rejected", ranges: []string{"fd00::1/128"}, wantErr: "fd00::1/128: too small"},
		{
			name: "v6 /64 skips subnet-router anycast and gateway", ranges: []string{"fd00:1:2:3::/64"},
			wantGW: []string{"fd00:1:2:3::1"},
			want:   [][]string{{"fd00:1:2:3::2"}, {"fd00:1:2:3::3"}, {"fd00:1:2:3::4"}},
		},
		{
			name: "dual-stack, given v6 first, returns v4 first", ranges: []string{"fd00::/126", "192.168.7.0/30"},
			wantGW: []string{"192.168.7.1", "fd00::1"},
			want:   [][]string{{"192.168.7.2", "fd00::2"}}, exhausted: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := Open(t.TempDir(), prefixes(t, tt.ranges...), Options{})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Open: got error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			t.Cleanup(func() { a.Close() })
			if got, want := a.Gateways(), addrs(tt.wantGW...); !slices.Equal(got, want) {
				t.Errorf("Gateways() = %v, want %v", got, want)
			}
			for i, w := range tt.want {
				got, err := a.Allocate(Owner{ContainerID: "c", IfName: string(rune('a' + i))})
				if err != nil {
					t.Fatalf("Allocate #%d: %v", i, err)
				}
				if want := addrs(w...); !slices.Equal(got, want) {
					t.Errorf("Allocate #%d = %v, want %v", i, got, want)
				}
			}
			if tt.exhausted {
				_, err := a.Allocate(Owner{ContainerID: "c", IfName: "last"})
				if !errors.Is(err, ErrExhausted) {
					t.Errorf("Allocate after last: got %v, want ErrExhausted", err)
				}
				if got := len(a.List()); got != len(tt.want) {
					t.Errorf("after exhaustion List has %d allocations, want %d (a failed call must not allocate)", got, len(tt.want))
				}
			}
		})
	}
}

// TestGateway checks Gateway per family, including an unconfigured family.
func TestGateway(t *testing.T) {
	a, err := Open(t.TempDir(), prefixes(t, "10.1.0.0/16"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if gw, ok := a.Gateway(IPv4); !ok || gw != netip.MustParseAddr("10.1.0.1") {
		t.Errorf("Gateway(IPv4) = %v, %v; want 10.1.0.1, true", gw, ok)
	}
	if gw, ok := a.Gateway(IPv6); ok {
		t.Errorf("Gateway(IPv6) = %v, true; want false on an IPv4-only allocator", gw)
	}
}

// TestRangeValidation checks that bad range sets are rejected with an error
// naming the offending value.
func TestRangeValidation(t *testing.T) {
	tests := []struct {
		name    string
		ranges  []netip.Prefix
		wantErr []string
	}{
		{"none", nil, []string{"no ranges"}},
		{"non-canonical v4", prefixes(t, "10.0.0.1/24"), []string{"10.0.0.1/24", "not canonical", "10.0.0.0/24"}},
		{"non-canonical v6", prefixes(t, "fd00::1/64"), []string{"fd00::1/64", "not canonical"}},
		{"overlap", prefixes(t, "10.0.0.0/16", "10.0.1.0/24"), []string{"10.0.1.0/24 overlaps range 10.0.0.0/16"}},
		{"same range twice", prefixes(t, "fd00::/64", "fd00::/64"), []string{"fd00::/64 overlaps"}},
		{"two v4", prefixes(t, "10.0.0.0/24", "10.0.1.0/24"), []string{"10.0.1.0/24: more than one IPv4 range"}},
		{"two v6", prefixes(t, "fd00::/64", "fd01::/64"), []string{"fd01::/64: more than one IPv6 range"}},
		{"v4-mapped", prefixes(t, "::ffff:10.0.0.0/120"), []string{"::ffff:10.0.0.0/120", "IPv4-mapped"}},
		{"zero prefix", []netip.Prefix{{}}, []string{"invalid prefix"}},
		{"every error reported", prefixes(t, "10.0.0.1/24", "fd00::/128"), []string{"10.0.0.1/24", "fd00::/128"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := Open(t.TempDir(), tt.ranges, Options{})
			if err == nil {
				a.Close()
				t.Fatalf("Open(%v) succeeded, want error", tt.ranges)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Open(%v) error %q does not contain %q", tt.ranges, err, w)
				}
			}
		})
	}
}

// TestRangeNextWraps checks the cursor walk at the top of a range.
func TestRangeNextWraps(t *testing.T) {
	tests := []struct {
		prefix, from, want string
	}{
		{"10.0.0.0/29", "10.0.0.2", "10.0.0.3"},
		{"10.0.0.0/29", "10.0.0.6", "10.0.0.2"}, // last usable wraps to first
		{"10.0.0.0/29", "10.0.0.7", "10.0.0.2"}, // broadcast is not a position
		{"10.0.0.0/29", "10.0.1.1", "10.0.0.2"}, // outside the range: start over
		{"fd00::/120", "fd00::ff", "fd00::2"},   // last address is usable, then wraps
		{"fd00::/120", "fd00::fe", "fd00::ff"},  // no broadcast in IPv6
		{"0.0.0.0/0", "255.255.255.254", "0.0.0.2"},
	}
	for _, tt := range tests {
		r, err := newRange(netip.MustParsePrefix(tt.prefix))
		if err != nil {
			t.Fatal(err)
		}
		if got := r.next(netip.MustParseAddr(tt.from)); got != netip.MustParseAddr(tt.want) {
			t.Errorf("%s: next(%s) = %s, want %s", tt.prefix, tt.from, got, tt.want)
		}
	}
}
