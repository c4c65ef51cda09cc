package agent

import (
	"flag"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// TestConfigValidate: the defaults with a pod CIDR are valid; every bad
// field is reported, naming its flag.
func TestConfigValidate(t *testing.T) {
	valid := func() Config {
		c := DefaultConfig()
		c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}
		return c
	}
	for _, tc := range []struct {
		name   string
		modify func(*Config)
		// want are substrings of the error; none means valid.
		want []string
	}{
		{"defaults", func(*Config) {}, nil},
		{"dual stack", func(c *Config) {
			c.PodCIDRs = append(c.PodCIDRs, netip.MustParsePrefix("2001:db8::/64"))
		}, nil},
		{"v6 only", func(c *Config) { c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("2001:db8::/64")} }, nil},
		{"metrics disabled", func(c *Config) { c.MetricsAddr = "" }, nil},
		{"no pod cidr", func(c *Config) { c.PodCIDRs = nil }, []string{"--pod-cidr: required"}},
		{"two v4", func(c *Config) {
			c.PodCIDRs = append(c.PodCIDRs, netip.MustParsePrefix("10.245.0.0/16"))
		}, []string{"more than one IPv4"}},
		{"host bits", func(c *Config) { c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.1/24")} }, []string{"--pod-cidr", "host bits"}},
		{"too small", func(c *Config) { c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/31")} }, []string{"--pod-cidr"}},
		{"everything wrong", func(c *Config) {
			c.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.1/8")}
			c.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.1/16")}
			c.Uplink = "has space"
			c.MTU = 100
			c.SocketPath = "relative.sock"
			c.StateDir = "state"
			c.SandboxDir = "/" + strings.Repeat("d", 40)
			c.MetricsAddr = "nohostport"
		}, []string{"--cluster-cidr", "--service-cidr: 10.96.0.1/16", "--uplink", "--mtu", "--socket", "--state-dir", "--sandbox-dir", "--metrics-addr"}},
		{"no link limit", func(c *Config) { c.LinkRxLimit = endpoint.RxLimit{} }, nil},
		{"link limits", func(c *Config) {
			c.LinkRxLimit = endpoint.RxLimit{PacketsPerSecond: 10, BytesPerSecond: -1}
		}, []string{"--link-max-pps: 10: want 0 (unlimited) or at least 1000", "--link-max-bytes: -1"}},
		{"host check interval", func(c *Config) { c.HostCheckInterval = 0 }, []string{"--host-check-interval: 0s: want a positive duration"}},
		{"negative poll", func(c *Config) { c.PollMax = -time.Microsecond }, []string{"--poll-max: -1µs: want 0 (never poll) up to 1ms"}},
		{"long poll", func(c *Config) { c.PollMax = 2 * time.Millisecond }, []string{"--poll-max: 2ms: want 0 (never poll) up to 1ms"}},
		{"last policy queue", func(c *Config) { c.PolicyQueue = 65535 }, []string{"--policy-queue: 65535: want 1 to 65534"}},
		{"policy queue 0", func(c *Config) { c.PolicyQueue = 0 }, []string{"--policy-queue: 0: want 1 to 65534"}},
		{"negative tx wait", func(c *Config) { c.ShmTxWait = -time.Millisecond }, []string{"--shm-tx-wait: -1ms: want 0 (never wait) up to 10ms"}},
		{"long tx wait", func(c *Config) { c.ShmTxWait = time.Second }, []string{"--shm-tx-wait: 1s: want 0 (never wait) up to 10ms"}},
		{"shm conf dir", func(c *Config) {
			c.CNIConfSource, c.CNIConfDir, c.CNIShmConfDir = "/etc/shm-cni/10-shm-cni.conflist", "/etc/cni/net.d", "/etc/cni/net.d/"
		}, []string{"--cni-shm-conf-dir: \"/etc/cni/net.d/\" is --cni-conf-dir"}},
		{"relative shm conf dir", func(c *Config) {
			c.CNIConfSource, c.CNIShmConfDir = "/etc/shm-cni/10-shm-cni.conflist", "net.d-shm"
		}, []string{"--cni-shm-conf-dir: \"net.d-shm\" is not an absolute path"}},
		{"chained binaries", func(c *Config) {
			c.CNIBinarySource, c.CNIChainedBinaries = "/usr/local/bin/shm-cni", []string{"/usr/local/bin/portmap", "/usr/local/bin/bandwidth"}
		}, nil},
		{"bad chained binaries", func(c *Config) {
			c.CNIChainedBinaries = []string{"portmap", "/a/bandwidth", "/b/bandwidth", "/usr/local/bin/shm-cni"}
			c.CNIBinDir = "opt/cni/bin"
		}, []string{
			`--cni-chained-binaries: "portmap" is not an absolute path`,
			`--cni-chained-binaries: "/b/bandwidth": a second binary named bandwidth`,
			`--cni-chained-binaries: "/usr/local/bin/shm-cni": a second binary named shm-cni`,
			`--cni-bin-dir: "opt/cni/bin" is not an absolute path`,
		}},
		{"shm mtu", func(c *Config) { c.ShmMTU = 1279 }, []string{"--shm-mtu: 1279 is not in 1280..65535"}},
		{"shm mtu too large", func(c *Config) { c.ShmMTU = 65536 }, []string{"--shm-mtu: 65536 is not in"}},
		{"v6 mtu", func(c *Config) {
			c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("2001:db8::/64")}
			c.MTU = 1000
		}, []string{"--mtu: 1000 is not in 1280"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := valid()
			tc.modify(&c)
			err := c.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("got %v, want valid", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got valid, want errors %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// TestConfigFlags: repeated and comma-separated CIDR flags accumulate and
// every flag lands in its field.
func TestConfigFlags(t *testing.T) {
	c := DefaultConfig()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	c.RegisterFlags(fs)
	err := fs.Parse([]string{
		"--pod-cidr", "10.244.1.0/24, 2001:db8::/64", "--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "10.96.0.0/12",
		"--service-cidr", "10.96.0.0/12,fd00:10:96::/108",
		"--uplink", "up0", "--mtu", "9000", "--shm-mtu", "16000", "--socket", "/run/x.sock", "--state-dir", "/var/lib/x", "--sandbox-dir", "/run/x",
		"--metrics-addr", ":9999", "--masquerade=false", "--log-level", "debug",
		"--link-max-pps", "20000", "--link-max-bytes", "1e8", "--fast-path=false", "--one-copy=false",
		"--forward-accept=false", "--ip-forward", "--host-check-interval", "5s", "--poll-max", "50us",
		"--shm-tx-wait", "3ms", "--policy-queue", "100",
		"--cni-chained-binaries", "/usr/local/bin/portmap, /usr/local/bin/tuning", "--cni-chained-binaries", "/usr/local/bin/bandwidth",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("2001:db8::/64")},
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12")},
		ServiceCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00:10:96::/108")},
		Uplink:       "up0", MTU: 9000, ShmMTU: 16000, SocketPath: "/run/x.sock", StateDir: "/var/lib/x", SandboxDir: "/run/x",
		MetricsAddr: ":9999", Masquerade: false, LogLevel: slog.LevelDebug,
		LinkRxLimit:   endpoint.RxLimit{PacketsPerSecond: 20000, BytesPerSecond: 1e8},
		ForwardAccept: false, IPForward: true, HostCheckInterval: 5 * time.Second, PollMax: 50 * time.Microsecond, OneCopy: false,
		ShmTxWait: 3 * time.Millisecond, PolicyQueue: 100,
		CNIChainedBinaries: []string{"/usr/local/bin/portmap", "/usr/local/bin/tuning", "/usr/local/bin/bandwidth"},
	}
	if got := c; !equalConfig(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("parsed config invalid: %v", err)
	}
	if err := fs.Parse([]string{"--pod-cidr", "10.0.0.0/33"}); err == nil {
		t.Error("bad CIDR accepted")
	}
}

func equalConfig(a, b Config) bool {
	eq := func(x, y []netip.Prefix) bool {
		if len(x) != len(y) {
			return false
		}
		for i := range x {
			if x[i] != y[i] {
				return false
			}
		}
		return true
	}
	return eq(a.PodCIDRs, b.PodCIDRs) && eq(a.ClusterCIDRs, b.ClusterCIDRs) && eq(a.ServiceCIDRs, b.ServiceCIDRs) && a.Uplink == b.Uplink && a.MTU == b.MTU && a.ShmMTU == b.ShmMTU &&
		a.SocketPath == b.SocketPath && a.StateDir == b.StateDir && a.SandboxDir == b.SandboxDir &&
		a.MetricsAddr == b.MetricsAddr && a.Masquerade == b.Masquerade && a.LogLevel == b.LogLevel &&
		a.LinkRxLimit == b.LinkRxLimit && a.FastPath == b.FastPath && a.ForwardAccept == b.ForwardAccept &&
		a.IPForward == b.IPForward && a.HostCheckInterval == b.HostCheckInterval && a.PollMax == b.PollMax && a.OneCopy == b.OneCopy &&
		a.ShmTxWait == b.ShmTxWait && a.PolicyQueue == b.PolicyQueue && slices.Equal(a.CNIChainedBinaries, b.CNIChainedBinaries)
}
