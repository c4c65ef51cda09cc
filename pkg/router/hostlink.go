package router

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// Pods the host routes.
//
// A kernel pod on a veth link (the agent's kind veth) is not a link of the
// router: the host's kernel routes its traffic, between its veth and the
// host's other pods, the host itself and the world, as a veth pair of the
// ptp plugin does. The router only has to reach it: its addresses lie in
// the node's pod CIDRs, which the router takes as its own (a pod address
// without a link is dropped, blackhole.go), so AddHostLink routes them to
// the uplink instead, in the stack and on the fast path (toUplink), and
// keeps them from being given to a link. A sandbox's packet to such a pod
// leaves through the uplink as a packet to the host would, judged by the
// sandbox's egress rules; the pod's packets come in through the uplink as
// the host's do.

// ErrNoAntiSpoof is AddHostLink's error on a host whose nftables cannot
// check a veth link's sources (installAntiSpoof).
var ErrNoAntiSpoof = errors.New("no anti-spoofing for veth links on this host")

// AddHostLink registers id as a pod the host routes, at addrs (each inside
// one of the node's pod CIDRs and used by no other link). RemoveLink
// removes it. The router keeps the routes across its uplink's restarts. It
// fails with ErrNoAntiSpoof where the host would not drop what such a pod
// sends from another address (installAntiSpoof).
func (r *Router) AddHostLink(id string, addrs []netip.Addr) error {
	if err := r.checkHostLink(id, addrs); err != nil {
		return fmt.Errorf("add host link %s: %w", id, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == stateClosed {
		return fmt.Errorf("add host link %s: %w", id, ErrClosed)
	}
	if !r.antiSpoofOn.Load() {
		return fmt.Errorf("add host link %s: %w (the agent's log says why)", id, ErrNoAntiSpoof)
	}
	if _, ok := r.links[id]; ok {
		return fmt.Errorf("add host link %s: link exists", id)
	}
	if _, ok := r.hostLinks[id]; ok {
		return fmt.Errorf("add host link %s: link exists", id)
	}
	for _, a := range addrs {
		if owner, ok := r.owners[a]; ok {
			return fmt.Errorf("add host link %s: address %s is in use by link %s", id, a, owner)
		}
	}
	addrs = slices.Clone(addrs)
	r.hostLinks[id] = addrs
	for _, a := range addrs {
		r.owners[a] = id
	}
	r.addHostRoutesLocked(addrs)
	r.publishHostAddrsLocked()
	r.rebuildFastLocked()
	r.log.Info("host link added", "link", id, "addrs", addrs)
	return nil
}

// checkHostLink validates AddHostLink's arguments without the lock.
func (r *Router) checkHostLink(id string, addrs []netip.Addr) error {
	var errs []error
	if id == "" {
		errs = append(errs, errors.New("empty link id"))
	}
	return errors.Join(append(errs, r.podAddrsErrors(addrs)...)...)
}

// addHostRoutesLocked routes addrs to the uplink NIC, if the router has
// one (Start adds the routes of the host links registered before it).
//
// +checklocks:r.mu
func (r *Router) addHostRoutesLocked(addrs []netip.Addr) {
	if r.up == nil || r.up.nicID == 0 {
		return
	}
	for _, a := range addrs {
		r.stack.AddRoute(tcpip.Route{Destination: toSubnet(netip.PrefixFrom(a, a.BitLen())), NIC: r.up.nicID})
	}
}

// removeHostLinkLocked removes the host link id, reporting whether it had
// one.
//
// +checklocks:r.mu
func (r *Router) removeHostLinkLocked(id string) bool {
	addrs, ok := r.hostLinks[id]
	if !ok {
		return false
	}
	delete(r.hostLinks, id)
	for _, a := range addrs {
		delete(r.owners, a)
	}
	r.publishHostAddrsLocked()
	r.rebuildFastLocked()
	r.stack.RemoveRoutes(func(rt tcpip.Route) bool {
		for _, a := range addrs {
			if rt.Destination == toSubnet(netip.PrefixFrom(a, a.BitLen())) {
				return true
			}
		}
		return false
	})
	r.log.Info("host link removed", "link", id)
	return true
}

// installAntiSpoofLocked adds the anti-spoofing of veth links to the
// router's table (installAntiSpoof), or records why it could not.
//
// +checklocks:r.mu
func (r *Router) installAntiSpoofLocked() {
	err := r.withNFT(installAntiSpoof)
	r.antiSpoofOn.Store(err == nil)
	if err != nil {
		r.log.Error("veth links refused: the host's nftables cannot check their sources", "err", err)
	}
}
