package router

import (
	"errors"
	"fmt"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// Link describes a pod link's addressing.
type Link struct {
	// Addrs are the pod's addresses (its /32 and/or /128), each inside one
	// of the node's pod CIDRs and used by no other link.
	Addrs []netip.Addr
	// PodMAC is the pod side's MAC. The router installs static neighbor
	// entries Addrs -> PodMAC, so it never resolves pod addresses.
	// Required when the endpoint needs link resolution (Ethernet links);
	// ignored otherwise.
	PodMAC tcpip.LinkAddress
	// GatewayMAC, when set, becomes the endpoint's link address: the MAC
	// the router answers ARP and NDP for the gateway with on this link.
	// Empty keeps the endpoint's own.
	GatewayMAC tcpip.LinkAddress
	// Bandwidth limits the pod's traffic in each direction (bandwidth.go);
	// zero limits nothing. It must pass linkspec.Bandwidth.Validate.
	Bandwidth linkspec.Bandwidth
}

// link is a pod link the router has.
type link struct {
	ep     stack.LinkEndpoint
	filter *filterEndpoint
	nicID  tcpip.NICID
	addrs  []netip.Addr
	// fast is where the fast path writes to this link, and its counters.
	fast *fastDst
	// bw enforces the link's bandwidth limit; nil when it has none.
	bw *bandwidthEndpoint
}

// AddLink attaches ep as a new pod link named id: it creates a NIC, puts the
// link-local gateway addresses on it, adds a host route and (for links that
// need resolution) a static neighbor entry for each pod address. ep must not
// be attached to any stack; the router wraps it (see filter.go: only what
// the pod may send reaches the stack; bandwidth.go; forwardhold.go), and
// every lifecycle call reaches ep unchanged. On failure nothing is left
// behind and ep has been detached, closed and waited for, as by RemoveLink;
// the caller still owns what backs it.
func (r *Router) AddLink(id string, ep stack.LinkEndpoint, l Link) error {
	if err := r.checkLink(id, ep, l); err != nil {
		return r.refuse(ep, fmt.Errorf("add link %s: %w", id, err))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == stateClosed {
		return r.refuse(ep, fmt.Errorf("add link %s: %w", id, ErrClosed))
	}
	if _, ok := r.links[id]; ok {
		return r.refuse(ep, fmt.Errorf("add link %s: link exists", id))
	}
	if _, ok := r.hostLinks[id]; ok {
		return r.refuse(ep, fmt.Errorf("add link %s: link exists", id))
	}
	for _, a := range l.Addrs {
		if owner, ok := r.owners[a]; ok {
			return r.refuse(ep, fmt.Errorf("add link %s: address %s is in use by link %s", id, a, owner))
		}
	}
	if l.GatewayMAC != "" {
		ep.SetLinkAddress(l.GatewayMAC)
	}

	resolves := ep.Capabilities()&stack.CapabilityResolutionRequired != 0
	counters := &fastCounters{}
	var limited stack.LinkEndpoint = ep
	bw := newBandwidthEndpoint(ep, l.Bandwidth)
	if bw != nil {
		limited = bw
	}
	filter := newFilterEndpoint(limited, newPodIdentity(l, resolves), r.fast, counters, r.policy)
	wrapped := newHoldingEndpoint(filter, r.holds)
	fast := &fastDst{ep: wrapped, mtu: ep.MTU(), gwMAC: ep.LinkAddress(), counters: counters, tcpGSO: takesTCPGSO(ep), partial: partialWriter(ep)}
	if resolves {
		fast.podMAC = l.PodMAC
	}
	setDirect(fast, ep, bw != nil, &r.cfg)
	setWaiter(fast, ep, bw != nil)
	filter.self = fast
	nicID := r.stack.NextNICID()
	if err := r.stack.CreateNICWithOptions(nicID, wrapped, stack.NICOptions{Name: podNICPrefix + id}); err != nil {
		return fmt.Errorf("add link %s: create NIC: %s", id, err)
	}
	lk := &link{ep: wrapped, filter: filter, bw: bw, nicID: nicID, addrs: append([]netip.Addr(nil), l.Addrs...), fast: fast}
	success := false
	defer func() {
		if !success {
			r.removeNIC(lk)
		}
	}()
	if err := addGatewayAddrs(r.stack, nicID); err != nil {
		return fmt.Errorf("add link %s: %w", id, err)
	}
	for _, a := range l.Addrs {
		if resolves {
			if err := r.stack.AddStaticNeighbor(nicID, tcpipx.ProtocolOf(a), tcpipx.Addr(a), l.PodMAC); err != nil {
				return fmt.Errorf("add link %s: neighbor %s -> %s: %s", id, a, l.PodMAC, err)
			}
		}
		r.stack.AddRoute(tcpip.Route{Destination: toSubnet(netip.PrefixFrom(a, a.BitLen())), NIC: nicID})
	}
	for _, a := range l.Addrs {
		r.owners[a] = id
	}
	r.links[id] = lk
	r.rebuildFastLocked()
	success = true
	r.log.Info("link added", "link", id, "nic", nicID, "addrs", l.Addrs, "podMAC", l.PodMAC.String(), "bandwidth", l.Bandwidth.String())
	return nil
}

// refuse closes and waits for an endpoint AddLink refused before making a
// NIC for it, so that every failure of AddLink leaves ep in the same state,
// and returns err.
func (r *Router) refuse(ep stack.LinkEndpoint, err error) error {
	if ep != nil {
		ep.Close()
		ep.Wait()
	}
	return err
}

// checkLink validates AddLink's arguments without the lock.
func (r *Router) checkLink(id string, ep stack.LinkEndpoint, l Link) error {
	var errs []error
	if id == "" {
		errs = append(errs, errors.New("empty link id"))
	}
	if ep == nil {
		errs = append(errs, errors.New("nil endpoint"))
	} else if ep.IsAttached() {
		errs = append(errs, errors.New("endpoint already attached"))
	}
	errs = append(errs, r.podAddrsErrors(l.Addrs)...)
	if ep != nil && ep.Capabilities()&stack.CapabilityResolutionRequired != 0 {
		if !header.IsValidUnicastEthernetAddress(l.PodMAC) {
			errs = append(errs, fmt.Errorf("pod MAC %q: not a unicast Ethernet address", l.PodMAC))
		}
	}
	if l.GatewayMAC != "" && !header.IsValidUnicastEthernetAddress(l.GatewayMAC) {
		errs = append(errs, fmt.Errorf("gateway MAC %q: not a unicast Ethernet address", l.GatewayMAC))
	}
	if err := l.Bandwidth.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("bandwidth: %w", err))
	}
	return errors.Join(errs...)
}

// podAddrsErrors says what is wrong with the addresses of a new link or
// host link: none at all, one that cannot be a pod address (podAddrError),
// one listed twice.
func (r *Router) podAddrsErrors(addrs []netip.Addr) []error {
	var errs []error
	if len(addrs) == 0 {
		errs = append(errs, errors.New("no pod address"))
	}
	seen := make(map[netip.Addr]bool)
	for _, a := range addrs {
		if err := r.cfg.podAddrError(a); err != nil {
			errs = append(errs, err)
		}
		if seen[a] {
			errs = append(errs, fmt.Errorf("pod address %s: listed twice", a))
		}
		seen[a] = true
	}
	return errs
}

// RemoveLink removes the link id: its NIC, and with it the NIC's routes,
// neighbor entries and addresses. When it returns, the endpoint is detached,
// closed and its goroutines have stopped (see the package doc). Removing an
// unknown link is not an error, so RemoveLink may be repeated.
func (r *Router) RemoveLink(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == stateClosed {
		return nil // Close removed every link.
	}
	return r.removeLinkLocked(id)
}

// +checklocks:r.mu
func (r *Router) removeLinkLocked(id string) error {
	if r.removeHostLinkLocked(id) {
		return nil
	}
	lk, ok := r.links[id]
	if !ok {
		return nil
	}
	delete(r.links, id)
	for _, a := range lk.addrs {
		delete(r.owners, a)
	}
	r.rebuildFastLocked()
	r.removeNIC(lk)
	r.log.Info("link removed", "link", id, "nic", lk.nicID)
	return nil
}

// removeNIC removes lk's NIC and waits for its endpoint. RemoveNIC drops
// every route through the NIC and the NIC's neighbor cache, then calls
// ep.Attach(nil) and ep.Close(); it does not call ep.Wait, so we do. An
// endpoint may already have removed its NIC itself (through the stack's
// on-close action); the NIC is then unknown, which is fine.
func (r *Router) removeNIC(lk *link) {
	if err := r.stack.RemoveNIC(lk.nicID); err != nil {
		if _, unknown := err.(*tcpip.ErrUnknownNICID); !unknown {
			r.log.Warn("remove NIC", "nic", lk.nicID, "err", err.String())
		}
	}
	lk.ep.Wait()
}
