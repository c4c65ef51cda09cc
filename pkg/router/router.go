package router

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/policy"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// The link-local gateway every pod routes to. The router owns both on every
// pod link (and on its uplink and blackhole NICs, see addGatewayAddrs).
var (
	// GatewayV4 is the pods' IPv4 default gateway.
	GatewayV4 = netip.MustParseAddr("169.254.1.1")
	// GatewayV6 is the pods' IPv6 default gateway.
	GatewayV6 = netip.MustParseAddr("fe80::1")
)

// Errors callers may test with errors.Is.
var (
	// ErrUnknownLink is returned for a link id the router does not have.
	ErrUnknownLink = errors.New("unknown link")
	// ErrClosed is returned by every method after Close.
	ErrClosed = errors.New("router closed")
)

// state is the router's lifecycle state.
type state int

const (
	stateNew state = iota
	stateStarted
	stateClosed
)

// NIC names of the router's own NICs. Pod NICs are named "pod:" + link id,
// so no link id can take one of these.
const (
	uplinkNICName    = "uplink"
	blackholeNICName = "blackhole"
	podNICPrefix     = "pod:"
)

// Router is the node's userspace L3 router. Its methods are safe for
// concurrent use.
//
// LOCK ORDERING: Router.mu > gVisor's stack locks.
type Router struct {
	// cfg is the configuration with defaults applied. Immutable.
	cfg Config
	// log is the router's logger. Immutable.
	log *slog.Logger
	// stack is the netstack; it has its own locking. Immutable.
	stack *stack.Stack
	// hostNS is the host network namespace, captured by New and closed by
	// Close. Immutable.
	hostNS ns.NetNS
	// hole drops traffic for pod CIDR addresses without a link. Immutable.
	hole *blackhole
	// holds works around a gVisor IPv4 forwarding bug (forwardhold.go).
	// Immutable.
	holds *forwardHolds
	// fast is the pod-to-pod fast path (fastpath.go); its table changes
	// under mu. Immutable pointer.
	fast *fastPath
	// mtus are the links' MTUs for the router's path MTU answers
	// (pmtu.go); the pod links' change under mu. Immutable pointer.
	mtus *linkMTUs
	// policy enforces NetworkPolicy (policy.go); its snapshot is swapped
	// atomically. Immutable pointer.
	policy *policy.Enforcer
	// inForce is the snapshot SetPolicy installed last, once the host's
	// queueing for veth links has it too (Policy).
	inForce atomic.Pointer[policy.Snapshot]

	// mu guards the fields below and serialises every change to the
	// stack's NICs, addresses, routes and neighbors, and to the host.
	mu sync.Mutex
	// state is the lifecycle state. Guarded by mu.
	state state
	// links maps link ids to links. Guarded by mu.
	links map[string]*link
	// hostLinks maps the ids of the pods the host routes (hostlink.go)
	// to their addresses. Guarded by mu.
	hostLinks map[string][]netip.Addr
	// owners maps every pod address in use to its link id (a link's or
	// a host link's). Guarded by mu.
	owners map[netip.Addr]string
	// up is the uplink; nil before Start and after Close. Guarded by mu.
	up *uplink
	// nl is a netlink handle in hostNS; nil until Start. Guarded by mu.
	nl *netlink.Handle
	// masqOn reports whether the masquerade table is installed; written
	// under mu.
	masqOn atomic.Bool
	// antiSpoofOn reports whether the table has the anti-spoofing of
	// veth links (installAntiSpoof), without which AddHostLink refuses
	// them; written under mu.
	antiSpoofOn atomic.Bool
	// hostPol enforces NetworkPolicy on host links
	// (hostpolicy_linux.go); nil before Start, after stop, or where the
	// host cannot queue their packets. Written under mu.
	hostPol atomic.Pointer[hostPolicy]
	// hostAddrs are the host links' addresses (hostLinkAddrs).
	hostAddrs atomic.Pointer[map[netip.Addr]bool]

	// fwMu serialises the router's work on the host's firewall and
	// forwarding state: Start and stop (under mu) and the periodic check
	// (hostcheck_linux.go, without mu).
	fwMu sync.Mutex
	// fw keeps the host's forward path open; nil without
	// Config.ForwardAccept or before Start. Guarded by fwMu.
	fw *hostFirewall
	// host is the forwarding state last read. Guarded by fwMu.
	host hostState
	// stopCheck stops the periodic check; checkDone is closed when it
	// returned. Nil before Start. Guarded by mu.
	stopCheck, checkDone chan struct{}
	// fwd4 and fwd6 are the forwarding state last read (HostForwarding).
	fwd4, fwd6 atomic.Bool
	// fwRepairs counts what the periodic check put back (HostRepairs).
	fwRepairs atomic.Uint64
}

// New validates cfg, builds the router's netstack and records the calling
// thread's network namespace as the host namespace. It changes nothing on the
// host: Start does.
func New(cfg Config, log *slog.Logger) (*Router, error) {
	if log == nil {
		return nil, errors.New("new router: nil logger")
	}
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("new router: %w", err)
	}
	cfg.PodCIDRs = append([]netip.Prefix(nil), cfg.PodCIDRs...)
	cfg.ClusterCIDRs = append([]netip.Prefix(nil), cfg.ClusterCIDRs...)

	enf, err := newPolicyEnforcer(cfg, log)
	if err != nil {
		return nil, fmt.Errorf("new router: %w", err)
	}
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return nil, fmt.Errorf("new router: host netns: %w", err)
	}
	holds := newForwardHolds()
	mtus := &linkMTUs{uplink: uint32(cfg.UplinkMTU)}
	r := &Router{
		cfg:       cfg,
		log:       log,
		mtus:      mtus,
		stack:     newStack(holds, mtus),
		hostNS:    hostNS,
		hole:      &blackhole{},
		holds:     holds,
		fast:      &fastPath{hairpin: newHairpinTable(mtus.isPod)},
		policy:    enf,
		links:     make(map[string]*link),
		hostLinks: make(map[string][]netip.Addr),
		owners:    make(map[netip.Addr]string),
	}
	if err := r.addBlackhole(); err != nil {
		r.stack.Destroy()
		hostNS.Close()
		return nil, fmt.Errorf("new router: %w", err)
	}
	return r, nil
}

// newStack returns a netstack that forwards IPv4 and IPv6 between all of its
// NICs and answers ARP, NDP and ICMP echo for its own addresses. It registers
// no transport protocol: forwarding works at the network layer, and the
// router terminates no TCP or UDP (the privileged tests forward TCP through
// it). Echo replies and ICMP errors are produced by the network protocols.
// Non-default options:
//   - forwarding on, for IPv4 and IPv6, on every NIC (the default for NICs
//     created later too): the stack is a router.
//   - nftables hooks set to holds, which accepts every packet: the hook is
//     where the router works around a use-after-free in gVisor's IPv4
//     forwarding (see forwardhold.go), and where postrouting restores the
//     GSO metadata of TCP super-packets forwarded whole and fills in the
//     MTU of gVisor's ICMPv6 packet too big (routerHooks, pmtu.go).
//
// Defaults kept deliberately: HandleLocal off (nothing is delivered locally
// but packets for the router's own addresses); IPv6 duplicate address
// detection off (ipv6.Options.DADConfigs zero), so fe80::1 is usable on a
// new link at once, and only the router owns it on each link; no SLAAC, no
// auto-generated link-local addresses, no router solicitations.
func newStack(holds *forwardHolds, mtus *linkMTUs) *stack.Stack {
	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocol,
			ipv6.NewProtocol,
			arp.NewProtocol,
		},
		NFTables: routerHooks{holds, mtus},
	})
	s.SetNFTablesConfigured(true)
	for _, proto := range []tcpip.NetworkProtocolNumber{ipv4.ProtocolNumber, ipv6.ProtocolNumber} {
		if err := s.SetForwardingDefaultAndAllNICs(proto, true); err != nil {
			// Only fails for a protocol that is not registered.
			panic(fmt.Sprintf("enable forwarding for protocol %d: %s", proto, err))
		}
	}
	return s
}

// routerHooks are the stack's nftables hooks: forwardHolds', and at
// postrouting endpoint.RestoreForwardedGSO. Pod TAP links and the uplink
// deliver the kernel's TCP super-packets whole
// (tap.Options.Forwarding); gVisor's forwarding copy drops their GSO metadata and would
// then refuse them as larger than the egress MTU. Postrouting runs on that
// copy before the MTU check, so restoring the metadata there carries them
// to the egress link, which writes them whole to a kernel (one write for up
// to 64 KiB instead of one per 1500 bytes) or segments them. Postrouting
// also sees the stack's own ICMP errors: the MTU its packet too big lacks
// goes in there; and the TCP SYNs crossing the uplink, whose MSS it clamps
// to the uplink's MTU (pmtu.go).
type routerHooks struct {
	*forwardHolds
	mtus *linkMTUs
}

// CheckPostrouting implements stack.NFTablesInterface.CheckPostrouting. It
// accepts every packet.
func (h routerHooks) CheckPostrouting(pkt *stack.PacketBuffer, r *stack.Route, af stack.AddressFamily) bool {
	if !endpoint.RestoreForwardedGSO(pkt) && !h.mtus.fillPacketTooBig(pkt) && r != nil {
		h.mtus.clampMSS(pkt, r.NICID())
	}
	return h.forwardHolds.CheckPostrouting(pkt, r, af)
}

// addBlackhole creates the blackhole NIC and routes the pod CIDRs to it. Pod
// host routes are longer, so only addresses without a link hit it; it has
// the gateway addresses so that forwarding finds a source address on it (the
// stack requires a link-local source to be on the outgoing NIC).
func (r *Router) addBlackhole() error {
	id := r.stack.NextNICID()
	if err := r.stack.CreateNICWithOptions(id, r.hole, stack.NICOptions{Name: blackholeNICName}); err != nil {
		return fmt.Errorf("create blackhole NIC: %s", err)
	}
	if err := addGatewayAddrs(r.stack, id); err != nil {
		return fmt.Errorf("blackhole NIC: %w", err)
	}
	for _, p := range r.cfg.PodCIDRs {
		r.stack.AddRoute(tcpip.Route{Destination: toSubnet(p), NIC: id})
	}
	return nil
}

// addGatewayAddrs puts the link-local gateway addresses on a NIC.
func addGatewayAddrs(s *stack.Stack, id tcpip.NICID) error {
	for _, a := range []netip.Addr{GatewayV4, GatewayV6} {
		pa := tcpip.ProtocolAddress{
			Protocol:          tcpipx.ProtocolOf(a),
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpipx.Addr(a), PrefixLen: a.BitLen()},
		}
		if err := s.AddProtocolAddress(id, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("add address %s to NIC %d: %s", a, id, err)
		}
	}
	return nil
}

// Start creates the uplink TUN device in the host namespace, assigns the
// node gateway addresses and routes the pod CIDRs to it, adds the stack's
// default routes through it and, with Masquerade, installs the nftables
// table (replacing any left over). On failure it undoes what it did.
func (r *Router) Start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case stateClosed:
		return fmt.Errorf("start router: %w", ErrClosed)
	case stateStarted:
		return errors.New("start router: already started")
	}

	success := false
	nl, err := netlink.NewHandleAt(netns.NsHandle(r.hostNS.Fd()))
	if err != nil {
		return fmt.Errorf("start router: netlink in host netns: %w", err)
	}
	r.nl = nl
	defer func() {
		if !success {
			r.stopUplinkLocked()
			r.nl.Close()
			r.nl = nil
		}
	}()

	fd, err := openUplink(r.hostNS, r.cfg.UplinkName)
	if err != nil {
		return fmt.Errorf("start router: %w", err)
	}
	up := &uplink{fd: fd}
	r.up = up
	if err := configureHostUplink(r.nl, r.cfg); err != nil {
		return fmt.Errorf("start router: %w", err)
	}
	raw, err := newUplinkEndpoint(fd, uint32(r.cfg.UplinkMTU), r.cfg.UplinkPoll, func(err error) {
		up.readerStopped(r.log, err)
	})
	if err != nil {
		return fmt.Errorf("start router: %w", err)
	}
	fastIn := newUplinkFastEndpoint(newHairpinEndpoint(newPolicyEndpoint(raw, r.policy), r.fast.hairpin), r.fast)
	ep := newHoldingEndpoint(fastIn, r.holds)
	r.up.ep = ep
	r.up.fast = &fastDst{ep: ep, mtu: uint32(r.cfg.UplinkMTU), tcpGSO: takesTCPGSO(raw), uplink: true, counters: &fastCounters{}}
	setDirect(r.up.fast, raw, false, &r.cfg)
	fastIn.self = r.up.fast
	id := r.stack.NextNICID()
	if err := r.stack.CreateNICWithOptions(id, ep, stack.NICOptions{Name: uplinkNICName}); err != nil {
		return fmt.Errorf("start router: create uplink NIC: %s", err)
	}
	r.up.nicID = id
	r.mtus.uplinkNIC.Store(uint32(id))
	r.fast.hairpin.up.Store(r.up.fast)
	// The uplink needs a source address of each family for the stack
	// to forward to it (see addBlackhole) and for ICMP errors to the host.
	if err := addGatewayAddrs(r.stack, id); err != nil {
		return fmt.Errorf("start router: uplink NIC: %w", err)
	}
	for _, p := range r.cfg.PodCIDRs {
		// The node gateway is inside the pod CIDR, which the blackhole
		// takes: route it to the host that owns it.
		gw, _ := NodeGateway(p)
		r.stack.AddRoute(tcpip.Route{Destination: toSubnet(netip.PrefixFrom(gw, gw.BitLen())), NIC: id})
		r.stack.AddRoute(tcpip.Route{Destination: defaultSubnet(p.Addr()), NIC: id})
	}
	for _, addrs := range r.hostLinks {
		r.addHostRoutesLocked(addrs)
	}
	// The NAT table: egress masquerade with Config.Masquerade
	// (masq_linux.go).
	r.masqOn.Store(true) // before: a partial install is removed
	if err := r.withNFT(func(c *nftables.Conn) error { return installMasquerade(c, r.cfg) }); err != nil {
		return fmt.Errorf("start router: %w", err)
	}
	r.installAntiSpoofLocked()
	r.startHostPolicyLocked()
	if err := r.startHostLocked(); err != nil {
		return fmt.Errorf("start router: %w", err)
	}
	r.state = stateStarted
	r.rebuildFastLocked()
	success = true
	r.log.Info("router started", "uplink", r.cfg.UplinkName, "podCIDRs", r.cfg.PodCIDRs,
		"masquerade", r.cfg.Masquerade, "forwardAccept", r.cfg.ForwardAccept)
	return nil
}

// startHostLocked turns forwarding on (Config.IPForward), opens the host's
// forward path for the pod traffic (Config.ForwardAccept), reads the
// forwarding state and starts the periodic check.
//
// +checklocks:r.mu
func (r *Router) startHostLocked() error {
	if r.cfg.IPForward {
		if err := r.enableForwarding(); err != nil {
			return err
		}
	}
	r.fwMu.Lock()
	defer r.fwMu.Unlock()
	if r.cfg.ForwardAccept {
		r.fw = newHostFirewall(r.cfg, r.hostNS, r.log)
		if _, err := r.fw.ensure(); err != nil {
			return fmt.Errorf("accept pod traffic in the host's forward path: %w", err)
		}
	}
	r.checkForwardingLocked()
	stop, done := make(chan struct{}), make(chan struct{})
	r.stopCheck, r.checkDone = stop, done
	go func() {
		defer close(done)
		r.keepHost(stop, r.cfg.HostCheckInterval)
	}()
	return nil
}

// stopHostLocked stops the periodic check and removes the forward path's
// accepts. Safe on a partial start.
//
// +checklocks:r.mu
func (r *Router) stopHostLocked() error {
	if r.stopCheck != nil {
		close(r.stopCheck)
		<-r.checkDone
		r.stopCheck, r.checkDone = nil, nil
	}
	r.fwMu.Lock()
	defer r.fwMu.Unlock()
	if r.fw == nil {
		return nil
	}
	err := r.fw.remove()
	r.fw = nil
	if err != nil {
		return fmt.Errorf("remove the host forward path's accepts: %w", err)
	}
	return nil
}

// withNFT runs f with an nftables connection in the host namespace.
func (r *Router) withNFT(f func(*nftables.Conn) error) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(r.hostNS.Fd())))
	if err != nil {
		return fmt.Errorf("nftables in host netns: %w", err)
	}
	return f(c)
}

// stopUplinkLocked undoes Start: the periodic check, the forward path's
// accepts, the masquerade table, the uplink NIC and
// its routes, the TUN fd and device. Safe on a partial Start.
//
// +checklocks:r.mu
func (r *Router) stopUplinkLocked() error {
	var errs []error
	if err := r.stopHostLocked(); err != nil {
		errs = append(errs, err)
	}
	if h := r.hostPol.Swap(nil); h != nil {
		h.stop()
	}
	if r.masqOn.Load() {
		if err := r.withNFT(removeMasquerade); err != nil {
			errs = append(errs, err)
		}
		r.masqOn.Store(false)
	}
	if r.up == nil {
		return errors.Join(errs...)
	}
	r.up.stopping.Store(true)
	r.mtus.uplinkNIC.Store(0)
	r.fast.hairpin.up.Store(nil)
	if r.up.nicID != 0 {
		// Removes the NIC's routes; detaches and closes the endpoint.
		if err := r.stack.RemoveNIC(r.up.nicID); err != nil {
			errs = append(errs, fmt.Errorf("remove uplink NIC: %s", err))
		}
	}
	if r.up.ep != nil {
		r.up.ep.Wait()
	}
	if err := r.up.closeFD(); err != nil {
		errs = append(errs, err)
	}
	if r.nl != nil {
		if err := deleteHostUplink(r.nl, r.cfg.UplinkName); err != nil {
			errs = append(errs, err)
		}
	}
	r.up = nil
	r.rebuildFastLocked()
	return errors.Join(errs...)
}

// Close removes every link, the uplink (NIC, TUN device, host routes) and the
// nftables table, then closes the stack and waits for every goroutine the
// router's endpoints started. It is idempotent.
func (r *Router) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == stateClosed {
		return nil
	}
	r.state = stateClosed
	var errs []error
	for _, id := range r.linkIDsLocked() {
		if err := r.removeLinkLocked(id); err != nil {
			errs = append(errs, err)
		}
	}
	if err := r.stopUplinkLocked(); err != nil {
		errs = append(errs, err)
	}
	if r.nl != nil {
		r.nl.Close()
		r.nl = nil
	}
	// Close stops protocol workers; Wait removes the remaining (blackhole)
	// NIC and waits for the endpoints.
	r.stack.Close()
	r.stack.Wait()
	if err := r.hostNS.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close host netns: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close router: %w", err)
	}
	r.log.Info("router closed")
	return nil
}

// Links returns the ids of the router's links and host links, sorted.
func (r *Router) Links() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.linkIDsLocked()
}

// +checklocks:r.mu
func (r *Router) linkIDsLocked() []string {
	ids := make([]string, 0, len(r.links)+len(r.hostLinks))
	for id := range r.links {
		ids = append(ids, id)
	}
	for id := range r.hostLinks {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// UnroutedDrops counts packets for pod CIDR addresses without a link, which
// the router dropped.
func (r *Router) UnroutedDrops() uint64 {
	return r.hole.dropped.Load()
}

// toSubnet converts a valid, masked prefix to a tcpip.Subnet.
func toSubnet(p netip.Prefix) tcpip.Subnet {
	return tcpip.AddressWithPrefix{Address: tcpipx.Addr(p.Addr()), PrefixLen: p.Bits()}.Subnet()
}

// defaultSubnet is the default route's destination in a's family.
func defaultSubnet(a netip.Addr) tcpip.Subnet {
	if a.Is4() {
		return header4Default
	}
	return header6Default
}

var (
	header4Default = toSubnet(netip.PrefixFrom(netip.IPv4Unspecified(), 0))
	header6Default = toSubnet(netip.PrefixFrom(netip.IPv6Unspecified(), 0))
)
