package router

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/shm-cni/shm-cni/internal/netipx"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// Defaults applied by New to zero fields of Config.
const (
	// DefaultUplinkName is the uplink TUN device's name in the host.
	DefaultUplinkName = "shm0"
	// DefaultUplinkMTU is the uplink's MTU: the Ethernet MTU, so that no
	// pod link (1500 by default) ever sees a larger packet from the host.
	DefaultUplinkMTU = 1500
	// DefaultHostCheckInterval is how often the router checks what it
	// keeps on the host (hostcheck_linux.go). A check runs the iptables
	// command a few times per family (a few milliseconds of CPU), so
	// twice a minute keeps an idle agent idle while a flushed rule is
	// back within half a minute.
	DefaultHostCheckInterval = 30 * time.Second
)

const (
	// maxMTU is the largest IP packet, 2^16-1 bytes.
	maxMTU = linkspec.MaxMTU
	// maxPodPrefixBits4 leaves room for network, gateway, one pod and
	// broadcast: a /30 has 2^(32-30) = 4 addresses.
	maxPodPrefixBits4 = 30
	// maxPodPrefixBits6 leaves room for the subnet-router anycast address
	// (RFC 4291 section 2.6.1), the gateway and pods: 2^(128-126) = 4.
	maxPodPrefixBits6 = 126
)

// Config is the router's configuration. The zero value of every field but
// PodCIDRs is usable.
type Config struct {
	// PodCIDRs are the node's pod CIDRs: at most one IPv4 and one IPv6
	// prefix (v4-only, v6-only or dual-stack), as Kubernetes allocates them.
	// Pod addresses come from these; the host routes them to the uplink.
	PodCIDRs []netip.Prefix

	// ClusterCIDRs are destinations never masqueraded (every node's pod
	// CIDRs, the service CIDRs). The node's own PodCIDRs are always
	// exempt.
	ClusterCIDRs []netip.Prefix

	// UplinkName names the uplink TUN device. Empty means
	// DefaultUplinkName.
	UplinkName string

	// UplinkMTU is the uplink's MTU. Zero means DefaultUplinkMTU.
	UplinkMTU int

	// Masquerade enables source NAT (nftables masquerade in the host) of
	// pod traffic to destinations outside PodCIDRs and ClusterCIDRs. The
	// agent turns it on by default; the zero value leaves it off. (Pod
	// traffic the host sends back through the uplink, a same-node Service,
	// is masqueraded either way: masq_linux.go.)
	Masquerade bool

	// ForwardAccept accepts the pod traffic in the host's forward path
	// (iptables FORWARD and DOCKER-USER, nftables forward chains), so that
	// a host firewall whose forward policy is drop does not drop it
	// (hostfw_linux.go). The agent turns it on by default.
	ForwardAccept bool

	// IPForward turns the host's IP forwarding on at Start for the pod
	// CIDRs' families (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding).
	// Off, the router only reads it and logs when it is off.
	IPForward bool

	// HostCheckInterval is how often the router checks its accepts, its
	// masquerade table and the forwarding state on the host, putting back
	// what another program removed. Zero means DefaultHostCheckInterval.
	HostCheckInterval time.Duration

	// NoFastPath sends pod-to-pod packets through gVisor's forwarding
	// instead of the fast path (fastpath.go); for comparison and
	// debugging.
	NoFastPath bool

	// OneCopy has the fast path write a sandbox's large TCP segments
	// from its shared memory straight to the next link instead of
	// through private memory (direct.go). The agent turns it on by
	// default (--one-copy): in timed streams of make bench it cut the
	// machine's CPU per GiB from one sandbox to another or to the outside
	// by about a tenth (README).
	OneCopy bool

	// UplinkPoll is the uplink reader's tap.Options.Poll: the longest it
	// polls the TUN device after finding it empty. Zero means
	// endpoint.DefaultPollMax; negative means never poll.
	UplinkPoll time.Duration

	// PolicyQueue is the first of the two netfilter queues through which
	// the host's kernel hands the router the packets of host links that
	// NetworkPolicy must judge (PolicyQueue and PolicyQueue+1;
	// hostpolicy_linux.go). Zero means DefaultPolicyQueue.
	PolicyQueue uint16
}

// withDefaults returns c with its zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.UplinkName == "" {
		c.UplinkName = DefaultUplinkName
	}
	if c.UplinkMTU == 0 {
		c.UplinkMTU = DefaultUplinkMTU
	}
	if c.HostCheckInterval == 0 {
		c.HostCheckInterval = DefaultHostCheckInterval
	}
	if c.PolicyQueue == 0 {
		c.PolicyQueue = DefaultPolicyQueue
	}
	return c
}

// Validate reports every problem of c (after defaults are applied) at once.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	if c.PolicyQueue == 65535 {
		errs = append(errs, errors.New("policy queue 65535: the router takes two queues, this one and the next"))
	}
	if len(c.PodCIDRs) == 0 {
		errs = append(errs, errors.New("no pod CIDR"))
	}
	var has4, has6 bool
	for _, p := range c.PodCIDRs {
		if _, err := NodeGateway(p); err != nil {
			errs = append(errs, fmt.Errorf("pod CIDR %s: %w", p, err))
			continue
		}
		if p.Addr().Is4() {
			if has4 {
				errs = append(errs, fmt.Errorf("pod CIDR %s: more than one IPv4 pod CIDR", p))
			}
			has4 = true
		} else {
			if has6 {
				errs = append(errs, fmt.Errorf("pod CIDR %s: more than one IPv6 pod CIDR", p))
			}
			has6 = true
		}
	}
	for _, p := range c.ClusterCIDRs {
		if err := checkPrefix(p); err != nil {
			errs = append(errs, fmt.Errorf("cluster CIDR %s: %w", p, err))
		}
	}
	if c.HostCheckInterval < 0 {
		errs = append(errs, fmt.Errorf("host check interval %s: want a positive duration", c.HostCheckInterval))
	}
	if err := linkspec.CheckIfName(c.UplinkName); err != nil {
		errs = append(errs, fmt.Errorf("uplink name %q: %w", c.UplinkName, err))
	}
	if err := linkspec.CheckMTU(c.UplinkMTU, linkspec.MinNodeMTU(has6)); err != nil {
		errs = append(errs, fmt.Errorf("uplink MTU %w", err))
	}
	return errors.Join(errs...)
}

// NodeGateway returns the node gateway address of a pod CIDR: its first
// usable address (10.244.1.1 for 10.244.1.0/24, 2001:db8:1::1 for
// 2001:db8:1::/64). The host owns it on the uplink; pods never get it.
func NodeGateway(podCIDR netip.Prefix) (netip.Addr, error) {
	if err := checkPrefix(podCIDR); err != nil {
		return netip.Addr{}, err
	}
	maxBits := maxPodPrefixBits6
	if podCIDR.Addr().Is4() {
		maxBits = maxPodPrefixBits4
	}
	if podCIDR.Bits() > maxBits {
		return netip.Addr{}, fmt.Errorf("prefix longer than /%d leaves no room for pods", maxBits)
	}
	return podCIDR.Addr().Next(), nil
}

// checkPrefix accepts valid, masked IPv4 or IPv6 prefixes (no IPv4-mapped
// IPv6, no zone).
func checkPrefix(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return errors.New("invalid prefix")
	case p.Addr().Is4In6():
		return errors.New("IPv4-mapped IPv6 prefix")
	case p.Addr().Zone() != "":
		return errors.New("prefix has a zone")
	case p != p.Masked():
		return fmt.Errorf("host bits set (want %s)", p.Masked())
	}
	return nil
}

// podAddrError says why addr cannot be a pod address under cfg, or returns
// nil.
func (c Config) podAddrError(addr netip.Addr) error {
	if !addr.IsValid() || addr.Zone() != "" || addr.Is4In6() {
		return fmt.Errorf("pod address %s: not a plain IPv4 or IPv6 address", addr)
	}
	for _, p := range c.PodCIDRs {
		if !p.Contains(addr) {
			continue
		}
		gw, _ := NodeGateway(p)
		switch {
		case addr == p.Addr():
			return fmt.Errorf("pod address %s: network address of %s", addr, p)
		case addr == gw:
			return fmt.Errorf("pod address %s: node gateway of %s", addr, p)
		case addr.Is4() && addr == netipx.LastAddr(p):
			return fmt.Errorf("pod address %s: broadcast address of %s", addr, p)
		}
		return nil
	}
	return fmt.Errorf("pod address %s: outside the pod CIDRs %v", addr, c.PodCIDRs)
}
