package router

import (
	"net/netip"
	"strings"
	"testing"
)

// TestValidate checks that Validate accepts good configurations and names
// every problem of bad ones.
func TestValidate(t *testing.T) {
	p := netip.MustParsePrefix
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string // substrings of the error; none means valid
	}{
		{"v4 only", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}}, nil},
		{"v6 only", Config{PodCIDRs: []netip.Prefix{p("2001:db8:1::/64")}}, nil},
		{"dual stack", Config{
			PodCIDRs:     []netip.Prefix{p("10.244.1.0/24"), p("2001:db8:1::/64")},
			ClusterCIDRs: []netip.Prefix{p("10.244.0.0/16"), p("10.96.0.0/12")},
			UplinkName:   "up0", UplinkMTU: 9000, Masquerade: true,
		}, nil},
		{"smallest pod CIDRs", Config{PodCIDRs: []netip.Prefix{p("10.0.0.0/30"), p("2001:db8::/126")}}, nil},
		{"no pod CIDR", Config{}, []string{"no pod CIDR"}},
		{"two v4", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/24"), p("10.244.2.0/24")}}, []string{"more than one IPv4"}},
		{"two v6", Config{PodCIDRs: []netip.Prefix{p("2001:db8:1::/64"), p("2001:db8:2::/64")}}, []string{"more than one IPv6"}},
		{"host bits", Config{PodCIDRs: []netip.Prefix{p("10.244.1.5/24")}}, []string{"host bits set"}},
		{"v4 too long", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/31")}}, []string{"no room for pods"}},
		{"v6 too long", Config{PodCIDRs: []netip.Prefix{p("2001:db8::/127")}}, []string{"no room for pods"}},
		{"mapped", Config{PodCIDRs: []netip.Prefix{p("::ffff:10.0.0.0/120")}}, []string{"IPv4-mapped"}},
		{"invalid pod CIDR", Config{PodCIDRs: []netip.Prefix{{}}}, []string{"invalid prefix"}},
		{"bad cluster CIDR", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}, ClusterCIDRs: []netip.Prefix{p("10.0.0.1/8")}}, []string{"cluster CIDR"}},
		{"long uplink name", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}, UplinkName: "a-very-long-name0"}, []string{"longer than 15"}},
		{"slash in uplink name", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}, UplinkName: "a/b"}, []string{"contains"}},
		{"MTU too small for v6", Config{PodCIDRs: []netip.Prefix{p("2001:db8:1::/64")}, UplinkMTU: 1000}, []string{"uplink MTU 1000"}},
		{"MTU too big", Config{PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}, UplinkMTU: 70000}, []string{"uplink MTU 70000"}},
		{"every problem at once", Config{UplinkName: "..", UplinkMTU: -1}, []string{"no pod CIDR", "reserved name", "uplink MTU -1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want an error with %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

// TestNodeGateway checks the node gateway is the first usable address.
func TestNodeGateway(t *testing.T) {
	for _, tc := range []struct {
		cidr, want string
	}{
		{"10.244.1.0/24", "10.244.1.1"},
		{"10.0.0.0/8", "10.0.0.1"},
		{"192.0.2.4/30", "192.0.2.5"},
		{"2001:db8:1::/64", "2001:db8:1::1"},
		{"2001:db8::/126", "2001:db8::1"},
	} {
		got, err := NodeGateway(netip.MustParsePrefix(tc.cidr))
		if err != nil || got != netip.MustParseAddr(tc.want) {
			t.Errorf("NodeGateway(%s) = %v, %v; want %s", tc.cidr, got, err, tc.want)
		}
	}
	for _, bad := range []string{"10.244.1.0/31", "10.244.1.1/24", "2001:db8::/128"} {
		if got, err := NodeGateway(netip.MustParsePrefix(bad)); err == nil {
			t.Errorf("NodeGateway(%s) = %v, want an error", bad, got)
		}
	}
}

// TestPodAddrError checks which addresses a pod may have.
func TestPodAddrError(t *testing.T) {
	cfg := Config{PodCIDRs: []netip.Prefix{
		netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("2001:db8:1::/64"),
	}}
	for _, tc := range []struct {
		addr string
		want string // substring of the error; empty means allowed
	}{
		{"10.244.1.2", ""},
		{"10.244.1.254", ""},
		{"2001:db8:1::2", ""},
		{"2001:db8:1::ffff:ffff:ffff:ffff", ""},
		{"10.244.1.0", "network address"},
		{"10.244.1.1", "node gateway"},
		{"10.244.1.255", "broadcast"},
		{"2001:db8:1::", "network address"},
		{"2001:db8:1::1", "node gateway"},
		{"10.244.2.5", "outside the pod CIDRs"},
		{"169.254.1.1", "outside the pod CIDRs"},
		{"fe80::1%eth0", "not a plain"},
		{"::ffff:10.244.1.5", "not a plain"},
	} {
		err := cfg.podAddrError(netip.MustParseAddr(tc.addr))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("podAddrError(%s) = %v, want nil", tc.addr, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("podAddrError(%s) = %v, want an error with %q", tc.addr, err, tc.want)
		}
	}
}
