package kube

import (
	"cmp"
	"flag"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Route is a host route to a pod CIDR of another node via that node's
// address.
type Route struct {
	// Dst is the pod CIDR, a masked prefix.
	Dst netip.Prefix
	// Via is the node's address, of Dst's family.
	Via netip.Addr
}

// String formats r as ParseRoute reads it: "10.244.1.0/24=192.0.2.2".
func (r Route) String() string { return r.Dst.String() + "=" + r.Via.String() }

// Validate reports whether r can be a host route.
func (r Route) Validate() error {
	switch {
	case !r.Dst.IsValid() || r.Dst != r.Dst.Masked() || r.Dst.Addr().Is4In6():
		return fmt.Errorf("%s: destination is not a masked IPv4 or IPv6 prefix", r)
	case !r.Via.IsValid() || r.Via.Is4In6() || r.Via.Zone() != "":
		return fmt.Errorf("%s: gateway is not an IPv4 or IPv6 address", r)
	case r.Dst.Addr().Is4() != r.Via.Is4():
		return fmt.Errorf("%s: destination and gateway of different families", r)
	case r.Via.IsUnspecified() || r.Via.IsMulticast() || r.Via.IsLoopback():
		return fmt.Errorf("%s: gateway %s is not a unicast address", r, r.Via)
	}
	return nil
}

// ParseRoute parses "CIDR=GATEWAY".
func ParseRoute(s string) (Route, error) {
	dst, via, ok := strings.Cut(strings.TrimSpace(s), "=")
	if !ok {
		return Route{}, fmt.Errorf("%q is not CIDR=GATEWAY", s)
	}
	p, err := netip.ParsePrefix(strings.TrimSpace(dst))
	if err != nil {
		return Route{}, fmt.Errorf("%q: %w", s, err)
	}
	a, err := netip.ParseAddr(strings.TrimSpace(via))
	if err != nil {
		return Route{}, fmt.Errorf("%q: %w", s, err)
	}
	r := Route{Dst: p, Via: a}
	if err := r.Validate(); err != nil {
		return Route{}, err
	}
	return r, nil
}

// RouteList is a repeatable, comma-separated list of CIDR=GATEWAY routes,
// a flag.Value.
type RouteList []Route

var _ flag.Value = (*RouteList)(nil)

// String implements flag.Value.String.
func (l *RouteList) String() string {
	if l == nil {
		return ""
	}
	s := make([]string, len(*l))
	for i, r := range *l {
		s[i] = r.String()
	}
	return strings.Join(s, ",")
}

// Set implements flag.Value.Set: it appends every comma-separated route.
func (l *RouteList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		r, err := ParseRoute(f)
		if err != nil {
			return err
		}
		*l = append(*l, r)
	}
	return nil
}

// SortRoutes sorts routes by destination, then gateway.
func SortRoutes(rs []Route) {
	slices.SortFunc(rs, func(a, b Route) int {
		if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Dst.Bits(), b.Dst.Bits()); c != 0 {
			return c
		}
		return a.Via.Compare(b.Via)
	})
}

// NodePodCIDRs returns a Node's pod CIDRs: spec.podCIDRs, or the older
// single spec.podCIDR. An unparsable one is an error.
func NodePodCIDRs(n *corev1.Node) ([]netip.Prefix, error) {
	raw := n.Spec.PodCIDRs
	if len(raw) == 0 && n.Spec.PodCIDR != "" {
		raw = []string{n.Spec.PodCIDR}
	}
	out := make([]netip.Prefix, 0, len(raw))
	for _, s := range raw {
		p, err := netip.ParsePrefix(s)
		if err != nil || p != p.Masked() {
			return nil, fmt.Errorf("node %s: pod CIDR %q is not a masked prefix", n.Name, s)
		}
		out = append(out, p)
	}
	return out, nil
}

// nodeAddr returns the Node's first InternalIP of a family.
func nodeAddr(n *corev1.Node, v4 bool) (netip.Addr, bool) {
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err != nil || ip.Zone() != "" {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() == v4 {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// DesiredRoutes returns the routes a node named self needs to the other
// nodes' pod CIDRs: each via that node's InternalIP of the CIDR's family.
// It never routes one of self's own pod CIDRs nor a CIDR overlapping one,
// and a CIDR two nodes claim goes to the first by name. What it skips (a
// node without pod CIDRs or without an InternalIP of a family, conflicts)
// comes back as errors to log; the routes are sorted.
func DesiredRoutes(self string, nodes []*corev1.Node) ([]Route, []error) {
	var problems []error
	sorted := slices.Clone(nodes)
	slices.SortFunc(sorted, func(a, b *corev1.Node) int { return strings.Compare(a.Name, b.Name) })
	var own []netip.Prefix
	for _, n := range sorted {
		if n.Name == self {
			cidrs, err := NodePodCIDRs(n)
			if err != nil {
				problems = append(problems, err)
			}
			own = cidrs
		}
	}
	var routes []Route
	owner := map[netip.Prefix]string{}
	for _, n := range sorted {
		if n.Name == self {
			continue
		}
		cidrs, err := NodePodCIDRs(n)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		if len(cidrs) == 0 {
			problems = append(problems, fmt.Errorf("node %s: no pod CIDR yet", n.Name))
			continue
		}
	next:
		for _, p := range cidrs {
			for _, o := range own {
				if o.Overlaps(p) {
					problems = append(problems, fmt.Errorf("node %s: pod CIDR %s overlaps this node's %s: not routed", n.Name, p, o))
					continue next
				}
			}
			for q, name := range owner {
				if q.Overlaps(p) {
					problems = append(problems, fmt.Errorf("node %s: pod CIDR %s overlaps node %s's %s: not routed", n.Name, p, name, q))
					continue next
				}
			}
			via, ok := nodeAddr(n, p.Addr().Is4())
			if !ok {
				problems = append(problems, fmt.Errorf("node %s: no InternalIP of pod CIDR %s's family", n.Name, p))
				continue
			}
			r := Route{Dst: p, Via: via}
			if err := r.Validate(); err != nil {
				problems = append(problems, fmt.Errorf("node %s: %w", n.Name, err))
				continue
			}
			owner[p] = n.Name
			routes = append(routes, r)
		}
	}
	SortRoutes(routes)
	return routes, problems
}

// MergeRoutes returns static followed by the dynamic routes whose
// destination no static route overlaps: static routes win.
func MergeRoutes(static, dynamic []Route) ([]Route, []error) {
	out := slices.Clone(static)
	var problems []error
next:
	for _, r := range dynamic {
		for _, s := range static {
			if s.Dst.Overlaps(r.Dst) {
				problems = append(problems, fmt.Errorf("route %s: overlaps the static route %s, not routed", r, s))
				continue next
			}
		}
		out = append(out, r)
	}
	SortRoutes(out)
	return out, problems
}
