package kube

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol tags every route a Reconciler adds (the rtm_protocol of
// the route, "proto 147" in `ip route`): a Reconciler removes routes of this
// protocol only, so it never touches the kernel's, an administrator's or
// another daemon's. 147 is in neither Linux's rtnetlink.h nor iproute2's
// rt_protos list.
const RouteProtocol netlink.RouteProtocol = 147

// Reconciler makes the main routing table of a network namespace hold
// exactly a given list of RouteProtocol routes.
type Reconciler struct {
	nl  *netlink.Handle // immutable
	log *slog.Logger    // immutable
}

// NewReconciler returns a Reconciler working through nl, the handle of the
// host network namespace. nl stays the caller's.
func NewReconciler(nl *netlink.Handle, log *slog.Logger) (*Reconciler, error) {
	if nl == nil || log == nil {
		return nil, errors.New("new route reconciler: nil netlink handle or logger")
	}
	return &Reconciler{nl: nl, log: log}, nil
}

// Routes returns the RouteProtocol routes of the main table, sorted.
func (r *Reconciler) Routes() ([]Route, error) {
	nlr, err := r.list()
	if err != nil {
		return nil, err
	}
	out := make([]Route, 0, len(nlr))
	for _, x := range nlr {
		if rt, ok := fromNetlink(x); ok {
			out = append(out, rt)
		}
	}
	SortRoutes(out)
	return out, nil
}

func (r *Reconciler) list() ([]netlink.Route, error) {
	rs, err := r.nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("list routes of protocol %d: %w", RouteProtocol, err)
	}
	return rs, nil
}

// Sync adds or replaces every route of want (each tagged RouteProtocol)
// and deletes every other RouteProtocol route of the main table. A route
// whose destination is already routed otherwise (another protocol) is
// replaced. It goes on after a failing route and returns every error; an
// old route of ours to a destination it failed to route is deleted.
func (r *Reconciler) Sync(want []Route) error {
	have, err := r.list()
	if err != nil {
		return fmt.Errorf("sync routes: %w", err)
	}
	current := make(map[netip.Prefix]netlink.Route, len(have))
	for _, x := range have {
		if rt, ok := fromNetlink(x); ok {
			current[rt.Dst] = x
		}
	}
	var errs []error
	wanted := make(map[netip.Prefix]bool, len(want))
	for _, w := range want {
		if err := w.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("sync routes: %w", err))
			continue
		}
		if wanted[w.Dst] {
			errs = append(errs, fmt.Errorf("sync routes: %s: a second route to %s", w, w.Dst))
			continue
		}
		wanted[w.Dst] = true
		if x, ok := current[w.Dst]; ok {
			if rt, ok := fromNetlink(x); ok && rt == w {
				continue
			}
		}
		if err := r.nl.RouteReplace(toNetlink(w)); err != nil {
			// An old route of ours to w.Dst goes below: it leads to
			// where the peer no longer is.
			wanted[w.Dst] = false
			errs = append(errs, fmt.Errorf("sync routes: replace %s: %w", w, err))
			continue
		}
		r.log.Info("route set", "dst", w.Dst, "via", w.Via)
	}
	for _, x := range have {
		if dst, ok := dstOf(x); ok && wanted[dst] {
			continue // kept, or replaced above
		}
		if err := r.nl.RouteDel(&x); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("sync routes: delete %s: %w", x, err))
			continue
		}
		r.log.Info("stale route removed", "dst", x.Dst, "via", x.Gw)
	}
	return errors.Join(errs...)
}

// toNetlink is w as a main-table unicast route of RouteProtocol.
func toNetlink(w Route) *netlink.Route {
	return &netlink.Route{
		Dst:      &net.IPNet{IP: w.Dst.Addr().AsSlice(), Mask: net.CIDRMask(w.Dst.Bits(), w.Dst.Addr().BitLen())},
		Gw:       w.Via.AsSlice(),
		Protocol: RouteProtocol,
		Table:    unix.RT_TABLE_MAIN,
		Type:     unix.RTN_UNICAST,
		Scope:    netlink.SCOPE_UNIVERSE,
	}
}

// dstOf returns a route's destination, false for a default route.
func dstOf(x netlink.Route) (netip.Prefix, bool) {
	if x.Dst == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(x.Dst.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := x.Dst.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// fromNetlink reads a single-gateway route; ok is false for any other
// shape (a default route, a multipath or device route), which Sync then
// deletes when it carries RouteProtocol.
func fromNetlink(x netlink.Route) (Route, bool) {
	dst, ok := dstOf(x)
	if !ok || x.Gw == nil || len(x.MultiPath) > 0 {
		return Route{}, false
	}
	via, ok := netip.AddrFromSlice(x.Gw)
	if !ok {
		return Route{}, false
	}
	return Route{Dst: dst, Via: via.Unmap()}, true
}
