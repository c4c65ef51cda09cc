package agent

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/kube"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// Defaults of Config, also the flags' defaults.
const (
	DefaultUplink = router.DefaultUplinkName
	DefaultMTU    = 1500
	// DefaultShmMTU is the default MTU of sandbox (shm) links.
	DefaultShmMTU      = linkspec.DefaultShmMTU
	DefaultStateDir    = "/var/lib/shm-cni"
	DefaultSandboxDir  = "/run/shm-cni/sandbox"
	DefaultMetricsAddr = "127.0.0.1:9309"
	DefaultCNIBinDir   = "/opt/cni/bin"
	DefaultCNIConfDir  = "/etc/cni/net.d"
	// DefaultLinkMaxPPS is the default of --link-max-pps: above what a
	// sandbox's TCP sends at MTU 1500 through the fast path (about 150,000
	// frames a second on the project's 2-core test machine), so that it
	// costs well-behaved pods nothing there, while bounding what any one
	// pod can make the agent do on a machine fast enough to reach it.
	// Operators who want a pod's share to stay small set it lower (make
	// bench-hostile measures the trade).
	DefaultLinkMaxPPS = 200000
)

const (
	// maxSocketPath is the longest unix socket path: sun_path is 108
	// bytes with the terminating NUL.
	maxSocketPath = 107
	// maxSandboxSocketName bounds a per-link socket's file name: a 64-byte
	// container ID, "-", a 15-byte interface name and ".sock".
	maxSandboxSocketName = 64 + 1 + 15 + len(".sock")
)

// Config is the agent's configuration. DefaultConfig gives the defaults;
// RegisterFlags binds every field to a command-line flag.
type Config struct {
	// PodCIDRs are the node's pod CIDRs: one IPv4 and/or one IPv6 prefix
	// (--pod-cidr).
	PodCIDRs []netip.Prefix
	// ClusterCIDRs are never masqueraded: every node's pod CIDRs, the
	// service CIDRs (--cluster-cidr).
	ClusterCIDRs []netip.Prefix
	// ServiceCIDRs are the cluster's Service address ranges
	// (--service-cidr): a pod's packets to them skip its egress
	// NetworkPolicy in the router, since the host translates them to a
	// backend after it (see package policy). Empty: none.
	ServiceCIDRs []netip.Prefix
	// Uplink names the router's TUN device in the host (--uplink).
	Uplink string
	// MTU is the MTU of kernel-stack pods' links (kind tap) and of the
	// uplink (--mtu); an attach may ask for another.
	MTU int
	// ShmMTU is the MTU of sandbox links (kind shm) whose attach leaves
	// it to the agent (--shm-mtu), bounded by what the link's queue
	// carries (queue.Sizes.MaxMTU).
	ShmMTU int
	// SocketPath is the agentapi socket the CNI binary calls (--socket).
	SocketPath string
	// StateDir holds the IPAM state and the attachments (--state-dir).
	StateDir string
	// SandboxDir holds the per-link sockets sandboxes dial
	// (--sandbox-dir).
	SandboxDir string
	// MetricsAddr is where /metrics, /healthz, /readyz and /attachments
	// are served (--metrics-addr); empty disables the HTTP server.
	MetricsAddr string
	// Pprof adds Go's profiling endpoints (/debug/pprof/) to the HTTP
	// server (--pprof). Off by default: keep the server on loopback then.
	Pprof bool
	// Masquerade enables SNAT of egress leaving the cluster (--masquerade).
	Masquerade bool
	// ForwardAccept accepts the node's pod traffic in the host's forward
	// path (--forward-accept; router.Config.ForwardAccept). On by default.
	ForwardAccept bool
	// IPForward turns the host's IP forwarding on at start (--ip-forward;
	// router.Config.IPForward). Off by default: the agent then only says
	// when forwarding is off.
	IPForward bool
	// HostCheckInterval is how often the agent checks its rules and the
	// forwarding state on the host (--host-check-interval).
	HostCheckInterval time.Duration
	// FastPath forwards plain pod-to-pod packets without gVisor's
	// forwarding (--fast-path; router.Config.NoFastPath). On by default.
	FastPath bool
	// OneCopy writes sandboxes' large TCP segments from their shared
	// memory straight to the next link (--one-copy;
	// router.Config.OneCopy). On by default; --one-copy=false copies them
	// through the agent's memory.
	OneCopy bool
	// LinkRxLimit bounds what one pod can make the router receive on its
	// link (--link-max-pps, --link-max-bytes): beyond it the agent stops
	// reading that link for a while, so that a flooding pod spends its own
	// CPU, not the agent's, and other pods keep theirs. See
	// endpoint.RxLimit; DefaultLinkMaxPPS and zero bytes are the defaults.
	LinkRxLimit endpoint.RxLimit
	// PollMax is the longest a link's receive loop in the agent polls an
	// empty source (a pod's TAP device, a sandbox's ring, the uplink)
	// before it sleeps (--poll-max); within it, how long follows the gaps
	// between the link's frames (endpoint.Poll). Zero never polls.
	PollMax time.Duration
	// ShmTxWait is the longest the router's fast path waits for a
	// sandbox to post receive buffers when its ring is full, for one
	// packet of another pod (--shm-tx-wait): the sending pod's link stalls
	// that long instead of the packet being dropped, so that its TCP sees
	// back-pressure, not loss. Zero drops at once. See shm.Options.TxWait.
	ShmTxWait time.Duration
	// PolicyQueue is the first of the two netfilter queues through which
	// the host hands the agent the first packets of veth links'
	// connections that NetworkPolicy judges (--policy-queue;
	// router.Config.PolicyQueue). Another program must not read them.
	PolicyQueue uint
	// LogLevel is the level of the agent's logs (--log-level); the caller
	// builds the logger.
	LogLevel slog.Level

	// NodeName is the Kubernetes Node the agent runs on (--node-name,
	// default $NODE_NAME). With a Kubernetes API (Kubeconfig or in
	// cluster) the pod CIDRs come from the Node when PodCIDRs is empty,
	// and routes to the other nodes' pod CIDRs follow the Node list (see
	// ConnectKube).
	NodeName string
	// Kubeconfig is a kubeconfig file (--kubeconfig); empty means the
	// in-cluster configuration.
	Kubeconfig string
	// PeerRoutes are static host routes to other nodes' pod CIDRs
	// (--peer-routes CIDR=GATEWAY,...), kept with the learned ones.
	PeerRoutes kube.RouteList

	// CNIBinarySource, when set, is the shm-cni binary the agent installs
	// as CNIBinDir/shm-cni once it is ready (--cni-binary-source).
	CNIBinarySource string
	// CNIChainedBinaries are the binaries of plugins the conflist chains
	// after shm-cni (the image's portmap), which the agent installs into
	// CNIBinDir under their own file names, after the shm-cni binary and
	// before the conflist (--cni-chained-binaries).
	CNIChainedBinaries []string
	// CNIBinDir is where the CNI binaries go (--cni-bin-dir).
	CNIBinDir string
	// CNIConfSource, when set, is a conflist the agent validates and
	// writes into CNIConfDir, under its own file name, once it is ready
	// and after the binary (--cni-conf-source).
	CNIConfSource string
	// CNIConfDir is where the conflist goes (--cni-conf-dir).
	CNIConfDir string
	// CNIShmConfDir, when set with CNIConfSource, also receives the
	// conflist with every shm-cni plugin's kind set to shm
	// (--cni-shm-conf-dir): the CNI config directory of the runtime handler
	// whose sandboxes attach shared-memory links (containerd's per-handler
	// cni_conf_dir for runsc with --sharedmem-links).
	CNIShmConfDir string
}

// DefaultConfig returns the defaults. PodCIDRs has none: it is required.
func DefaultConfig() Config {
	return Config{
		Uplink:            DefaultUplink,
		MTU:               DefaultMTU,
		ShmMTU:            DefaultShmMTU,
		SocketPath:        agentapi.DefaultSocketPath,
		StateDir:          DefaultStateDir,
		SandboxDir:        DefaultSandboxDir,
		MetricsAddr:       DefaultMetricsAddr,
		Masquerade:        true,
		FastPath:          true,
		OneCopy:           true,
		ForwardAccept:     true,
		HostCheckInterval: router.DefaultHostCheckInterval,
		LinkRxLimit:       endpoint.RxLimit{PacketsPerSecond: DefaultLinkMaxPPS},
		PollMax:           endpoint.DefaultPollMax,
		ShmTxWait:         DefaultShmTxWait,
		PolicyQueue:       router.DefaultPolicyQueue,
		LogLevel:          slog.LevelInfo,
		CNIBinDir:         DefaultCNIBinDir,
		CNIConfDir:        DefaultCNIConfDir,
	}
}

// RegisterFlags binds c's fields to flags of fs, with c's current values as
// defaults.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.Var((*prefixList)(&c.PodCIDRs), "pod-cidr", "the node's pod CIDR; repeat or comma-separate for dual stack (required)")
	fs.Var((*prefixList)(&c.ClusterCIDRs), "cluster-cidr", "destination CIDRs never masqueraded (all pod and service CIDRs); repeatable, comma-separated")
	fs.Var((*prefixList)(&c.ServiceCIDRs), "service-cidr", "the cluster's Service CIDRs, for NetworkPolicy (the host translates them after the router); repeatable, comma-separated")
	fs.StringVar(&c.Uplink, "uplink", c.Uplink, "name of the router's TUN device in the host")
	fs.IntVar(&c.MTU, "mtu", c.MTU, "MTU of kernel-stack pods' links (kind tap) and of the uplink")
	fs.IntVar(&c.ShmMTU, "shm-mtu", c.ShmMTU, "MTU of sandbox links (kind shm) unless the conflist's shmMtu sets it; at most what the link's queue carries")
	fs.StringVar(&c.SocketPath, "socket", c.SocketPath, "unix socket the CNI binary calls")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "directory of the agent's persistent state")
	fs.StringVar(&c.SandboxDir, "sandbox-dir", c.SandboxDir, "directory of the per-link sockets sandboxes dial")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "host:port of the metrics and health endpoints; empty disables them")
	fs.BoolVar(&c.Pprof, "pprof", c.Pprof, "serve Go's profiling endpoints under /debug/pprof/ on the metrics address")
	fs.BoolVar(&c.Masquerade, "masquerade", c.Masquerade, "masquerade pod egress to destinations outside the cluster CIDRs")
	fs.BoolVar(&c.ForwardAccept, "forward-accept", c.ForwardAccept, "accept the node's pod traffic in the host's forward path (iptables FORWARD and DOCKER-USER, nftables forward chains) ahead of the host firewall's drops")
	fs.BoolVar(&c.IPForward, "ip-forward", c.IPForward, "turn the host's IP forwarding on at start (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding); without it the agent only says when it is off")
	fs.DurationVar(&c.HostCheckInterval, "host-check-interval", c.HostCheckInterval, "how often to check the agent's rules and the forwarding state on the host, putting back what another program removed")
	fs.BoolVar(&c.FastPath, "fast-path", c.FastPath, "forward plain pod-to-pod packets without the netstack's forwarding (false: everything through it)")
	fs.BoolVar(&c.OneCopy, "one-copy", c.OneCopy, "on the fast path, copy a sandbox's large TCP segments once, from its shared memory straight to the next link, instead of through the agent's memory")
	fs.Float64Var(&c.LinkRxLimit.PacketsPerSecond, "link-max-pps", c.LinkRxLimit.PacketsPerSecond,
		fmt.Sprintf("frames per second one pod may send into the router (a TCP super-packet is one); 0 is unlimited, else at least %d", endpoint.MinRxPacketsPerSecond))
	fs.Float64Var(&c.LinkRxLimit.BytesPerSecond, "link-max-bytes", c.LinkRxLimit.BytesPerSecond,
		fmt.Sprintf("bytes per second one pod may send into the router; 0 is unlimited, else at least %d", endpoint.MinRxBytesPerSecond))
	fs.DurationVar(&c.PollMax, "poll-max", c.PollMax, "longest a link's receive loop polls an empty source before it sleeps, following the gaps between the link's frames: busy links trade CPU for wake-ups, idle links never poll; 0 never polls")
	fs.DurationVar(&c.ShmTxWait, "shm-tx-wait", c.ShmTxWait, "longest the fast path waits, per packet, for a sandbox with a full receive ring to take it, holding up the sending pod's link only (back-pressure instead of loss); 0 drops at once")
	fs.UintVar(&c.PolicyQueue, "policy-queue", c.PolicyQueue, "the first of the two netfilter queues (this one and the next) through which the host hands the agent the first packets of veth links' connections that NetworkPolicy judges; no other program may read them")
	fs.TextVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn, error")
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "Kubernetes node name: pod CIDRs from its Node (without --pod-cidr) and routes to the other nodes' pod CIDRs")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig file; empty means the in-cluster configuration")
	fs.Var(&c.PeerRoutes, "peer-routes", "static routes to other nodes' pod CIDRs, CIDR=GATEWAY; repeatable, comma-separated")
	fs.StringVar(&c.CNIBinarySource, "cni-binary-source", c.CNIBinarySource, "shm-cni binary to install into --cni-bin-dir once ready; empty installs none")
	fs.Var((*pathList)(&c.CNIChainedBinaries), "cni-chained-binaries", "binaries of the plugins the conflist chains after shm-cni (portmap), installed into --cni-bin-dir under their own names before the conflist; repeatable, comma-separated")
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", c.CNIBinDir, "directory the CNI binaries are installed into")
	fs.StringVar(&c.CNIConfSource, "cni-conf-source", c.CNIConfSource, "conflist to write into --cni-conf-dir once ready; empty writes none")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", c.CNIConfDir, "directory the conflist is written into")
	fs.StringVar(&c.CNIShmConfDir, "cni-shm-conf-dir", c.CNIShmConfDir, "also write the conflist with kind shm into this directory (the CNI config directory of the runtime handler for sandboxes on shared-memory links); empty writes none")
}

// Validate reports every problem of c at once, each naming its flag.
func (c Config) Validate() error {
	var errs []error
	bad := func(flag, format string, args ...any) {
		errs = append(errs, fmt.Errorf("--%s: %s", flag, fmt.Sprintf(format, args...)))
	}
	has4, has6 := false, false
	if len(c.PodCIDRs) == 0 && c.NodeName == "" {
		bad("pod-cidr", "required (or --node-name, to read them from the Node)")
	}
	for _, p := range c.PodCIDRs {
		if _, err := router.NodeGateway(p); err != nil {
			bad("pod-cidr", "%s: %v", p, err)
			continue
		}
		if p.Addr().Is4() {
			if has4 {
				bad("pod-cidr", "%s: more than one IPv4 pod CIDR", p)
			}
			has4 = true
		} else {
			if has6 {
				bad("pod-cidr", "%s: more than one IPv6 pod CIDR", p)
			}
			has6 = true
		}
	}
	for _, f := range []struct {
		flag string
		l    []netip.Prefix
	}{{"cluster-cidr", c.ClusterCIDRs}, {"service-cidr", c.ServiceCIDRs}} {
		for _, p := range f.l {
			if !p.IsValid() || p != p.Masked() || p.Addr().Is4In6() {
				bad(f.flag, "%s: not a masked IPv4 or IPv6 prefix", p)
			}
		}
	}
	if err := linkspec.CheckIfName(c.Uplink); err != nil {
		bad("uplink", "%q is not a valid interface name: %v", c.Uplink, err)
	}
	if err := linkspec.CheckMTU(c.MTU, linkspec.MinNodeMTU(has6)); err != nil {
		bad("mtu", "%v", err)
	}
	if err := linkspec.CheckMTU(c.ShmMTU, linkspec.MinShmMTU); err != nil {
		bad("shm-mtu", "%v", err)
	}
	switch {
	case !filepath.IsAbs(c.SocketPath):
		bad("socket", "%q is not an absolute path", c.SocketPath)
	case len(c.SocketPath) > maxSocketPath:
		bad("socket", "%q is longer than %d bytes", c.SocketPath, maxSocketPath)
	}
	if c.LinkRxLimit.PacketsPerSecond != 0 && !(c.LinkRxLimit.PacketsPerSecond >= endpoint.MinRxPacketsPerSecond) {
		bad("link-max-pps", "%v: want 0 (unlimited) or at least %d", c.LinkRxLimit.PacketsPerSecond, endpoint.MinRxPacketsPerSecond)
	}
	if c.LinkRxLimit.BytesPerSecond != 0 && !(c.LinkRxLimit.BytesPerSecond >= endpoint.MinRxBytesPerSecond) {
		bad("link-max-bytes", "%v: want 0 (unlimited) or at least %d", c.LinkRxLimit.BytesPerSecond, endpoint.MinRxBytesPerSecond)
	}
	if c.PolicyQueue < 1 || c.PolicyQueue > 65534 {
		bad("policy-queue", "%d: want 1 to 65534 (the agent reads this queue and the next)", c.PolicyQueue)
	}
	if c.PollMax < 0 || c.PollMax > maxPollMax {
		bad("poll-max", "%s: want 0 (never poll) up to %s", c.PollMax, maxPollMax)
	}
	if c.ShmTxWait < 0 || c.ShmTxWait > maxShmTxWait {
		bad("shm-tx-wait", "%s: want 0 (never wait) up to %s", c.ShmTxWait, maxShmTxWait)
	}
	if c.HostCheckInterval <= 0 {
		bad("host-check-interval", "%s: want a positive duration", c.HostCheckInterval)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("state-dir", "%q is not an absolute path", c.StateDir)
	}
	switch {
	case !filepath.IsAbs(c.SandboxDir):
		bad("sandbox-dir", "%q is not an absolute path", c.SandboxDir)
	case len(filepath.Clean(c.SandboxDir))+1+maxSandboxSocketName > maxSocketPath:
		bad("sandbox-dir", "%q is too long: a per-link socket path there could exceed %d bytes", c.SandboxDir, maxSocketPath)
	}
	if c.MetricsAddr != "" {
		host, port, err := net.SplitHostPort(c.MetricsAddr)
		if err == nil {
			_, err = strconv.ParseUint(port, 10, 16)
		}
		if err == nil && host != "" {
			if _, perr := netip.ParseAddr(host); perr != nil && host != "localhost" {
				err = fmt.Errorf("host %q is not an IP address", host)
			}
		}
		if err != nil {
			bad("metrics-addr", "%q: %v", c.MetricsAddr, err)
		}
	}
	for _, r := range c.PeerRoutes {
		if err := r.Validate(); err != nil {
			bad("peer-routes", "%v", err)
			continue
		}
		for _, p := range c.PodCIDRs {
			if p.Overlaps(r.Dst) {
				bad("peer-routes", "%s overlaps this node's pod CIDR %s", r, p)
			}
		}
	}
	for _, f := range []struct{ flag, path string }{
		{"cni-binary-source", c.CNIBinarySource},
		{"cni-conf-source", c.CNIConfSource},
	} {
		if f.path != "" && !filepath.IsAbs(f.path) {
			bad(f.flag, "%q is not an absolute path", f.path)
		}
	}
	names := map[string]bool{PluginType: true}
	for _, b := range c.CNIChainedBinaries {
		switch name := filepath.Base(b); {
		case !filepath.IsAbs(b):
			bad("cni-chained-binaries", "%q is not an absolute path", b)
		case names[name]:
			bad("cni-chained-binaries", "%q: a second binary named %s in --cni-bin-dir", b, name)
		default:
			names[name] = true
		}
	}
	if (c.CNIBinarySource != "" || len(c.CNIChainedBinaries) > 0) && !filepath.IsAbs(c.CNIBinDir) {
		bad("cni-bin-dir", "%q is not an absolute path", c.CNIBinDir)
	}
	if c.CNIConfSource != "" {
		if !filepath.IsAbs(c.CNIConfDir) {
			bad("cni-conf-dir", "%q is not an absolute path", c.CNIConfDir)
		}
		switch {
		case c.CNIShmConfDir == "":
		case !filepath.IsAbs(c.CNIShmConfDir):
			bad("cni-shm-conf-dir", "%q is not an absolute path", c.CNIShmConfDir)
		case filepath.Clean(c.CNIShmConfDir) == filepath.Clean(c.CNIConfDir):
			bad("cni-shm-conf-dir", "%q is --cni-conf-dir: the shm conflist needs a directory of its own", c.CNIShmConfDir)
		}
		if !isConfName(filepath.Base(c.CNIConfSource)) {
			bad("cni-conf-source", "%q: the file name must end in .conflist (runtimes load only .conf, .conflist and .json files)", c.CNIConfSource)
		}
	}
	return errors.Join(errs...)
}

// isConfName reports whether a runtime loads a file of this name from its
// CNI config directory as a conflist.
func isConfName(name string) bool { return strings.HasSuffix(name, ".conflist") }

// prefixList is a repeatable, comma-separated list of CIDRs flag.
type prefixList []netip.Prefix

var _ flag.Value = (*prefixList)(nil)

// String implements flag.Value.String.
func (l *prefixList) String() string {
	if l == nil {
		return ""
	}
	s := make([]string, len(*l))
	for i, p := range *l {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// Set implements flag.Value.Set: it appends every comma-separated CIDR.
func (l *prefixList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return fmt.Errorf("%q is not a CIDR", f)
		}
		*l = append(*l, p)
	}
	return nil
}

// pathList is a repeatable, comma-separated list of file paths flag.
type pathList []string

var _ flag.Value = (*pathList)(nil)

// String implements flag.Value.String.
func (l *pathList) String() string {
	if l == nil {
		return ""
	}
	return strings.Join(*l, ",")
}

// Set implements flag.Value.Set: it appends every comma-separated path.
func (l *pathList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			*l = append(*l, f)
		}
	}
	return nil
}

// DefaultShmTxWait is --shm-tx-wait's default. Four streams from other
// sandboxes into one sandbox lost about a thousand segments per 3 s to its
// full ring without a wait (100-120 loss recoveries); with a millisecond
// about 50, at 1.2 times the rate and less CPU per GiB (make bench's
// sandbox → sandbox row, 4 streams). The wait holds up only the sending
// pod's link: it lets go of the sandbox link's transmit lock between tries,
// so the link's other writers, the uplink's reader among them, never queue
// behind it (shm.Options.TxWait), and a sandbox that frees nothing costs one
// wait until it frees room.
const DefaultShmTxWait = time.Millisecond

// maxShmTxWait bounds --shm-tx-wait: a pod's link held up longer stalls the
// pod's other traffic for longer than a retransmission would take.
const maxShmTxWait = 10 * time.Millisecond

// maxPollMax bounds --poll-max: a receive loop that polls longer than a
// millisecond holds a CPU through gaps a sleep would cost nothing across.
const maxPollMax = time.Millisecond

// pollOption is PollMax as the endpoints' Options.Poll take it (there zero
// means the default and a negative value never polling).
func (c Config) pollOption() time.Duration {
	if c.PollMax == 0 {
		return -1
	}
	return c.PollMax
}
