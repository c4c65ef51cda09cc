package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Direction is the direction of traffic a rule restricts, seen from the
// pod the policy selects.
type Direction uint8

// Directions.
const (
	Ingress Direction = iota
	Egress
)

// String returns the direction's metric label.
func (d Direction) String() string {
	if d == Egress {
		return "egress"
	}
	return "ingress"
}

// Input is what a Snapshot is compiled from.
type Input struct {
	// Policies are every NetworkPolicy of the cluster.
	Policies []*networkingv1.NetworkPolicy
	// Namespaces are the cluster's namespaces (their labels). A pod's
	// namespace without an object here has only the
	// kubernetes.io/metadata.name label the API server gives every one.
	Namespaces []*corev1.Namespace
	// Pods are every pod the node knows, local and remote: their labels,
	// addresses (Status.PodIPs, or Status.PodIP) and container ports.
	// Host-network pods and pods that ended (Succeeded, Failed) are
	// neither selected nor peers: their addresses are not theirs.
	Pods []*corev1.Pod
	// NodeName selects the local pods (Spec.NodeName), whose tables the
	// snapshot holds. Empty: every pod is local.
	NodeName string
	// NodeAddrs are the node's own addresses: traffic from them to a
	// local pod is always allowed in (kubelet probes).
	NodeAddrs []netip.Addr
	// ServiceCIDRs hold the cluster's Service addresses, which the host
	// translates to a backend after the router: see Enforcer.
	ServiceCIDRs []netip.Prefix
}

// Pod is a local pod's compiled policy. Immutable but for its counters.
type Pod struct {
	// Namespace and Name identify the pod.
	Namespace, Name string
	// tables are the pod's rules by Direction; nil when no policy
	// selects the pod for that direction (it is not isolated in it).
	tables [2]*Table
	// policies name the policies selecting the pod, by Direction.
	policies [2][]string
	// owner is the pod's share of the connection tracker and its
	// counters, kept from one snapshot to the next.
	owner *Owner
	// groups count the packets denied to or from the pod by Direction,
	// against the policies isolating it there (denied.go); nil where
	// it is not isolated.
	groups [2]*denyGroup
}

// Table returns the pod's table for d, nil when it is not isolated in d.
func (p *Pod) Table(d Direction) *Table { return p.tables[d] }

// Policies returns the names of the policies selecting the pod in d,
// sorted.
func (p *Pod) Policies(d Direction) []string { return slices.Clone(p.policies[d]) }

func (p *Pod) isolated() bool {
	return p != nil && (p.tables[Ingress] != nil || p.tables[Egress] != nil)
}

// Owner is what outlives snapshots for one pod: its connection tracker
// share and its denied-packet counters.
type Owner struct {
	key string
	// conns counts the tracker's connections charged to the pod.
	conns atomic.Int64
	// denied counts packets denied by Direction.
	denied [2]atomic.Uint64
	// refused counts new connections the tracker had no room for.
	refused atomic.Uint64
}

// Snapshot is a compiled set of policies: per local pod address, its
// tables. Immutable; readers need no lock. Compile builds a new one on
// every change and the Enforcer swaps it in.
type Snapshot struct {
	// gen is the snapshot's generation: tracked connections verified
	// under an older one are checked again.
	gen uint64
	// pods maps every address of every local pod to the pod.
	pods map[netip.Addr]*Pod
	// remote maps every address of every pod of another node that policy
	// isolates for egress to the pod, with its egress table alone: a
	// connection of its to a local pod through a Service was translated
	// after its own node's router, which could not judge it (see
	// Snapshot.decide).
	remote map[netip.Addr]*Pod
	// nodeAddrs are Input.NodeAddrs.
	nodeAddrs []netip.Addr
	// services are Input.ServiceCIDRs.
	services []netip.Prefix
	// problems are what Compile skipped (invalid selectors, CIDRs).
	problems []string
	// stats are the per-policy denied counts, shared with the snapshots
	// before and after.
	stats *denyStats
}

var generations atomic.Uint64

// Pod returns the local pod with address a, or nil.
func (s *Snapshot) Pod(a netip.Addr) *Pod { return s.pods[a] }

// IsolatedAddrs returns, sorted, every address a packet must come from or
// go to for policy to judge it: those of the local pods policy isolates in
// either direction and those of the pods of other nodes it isolates for
// egress (Snapshot.remote). A packet between two other addresses passes
// unjudged.
func (s *Snapshot) IsolatedAddrs() []netip.Addr {
	var out []netip.Addr
	for a, p := range s.pods {
		if p.isolated() {
			out = append(out, a)
		}
	}
	for a := range s.remote {
		if s.pods[a] == nil {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// Pods returns every local pod once, sorted by namespace and name.
func (s *Snapshot) Pods() []*Pod {
	seen := map[*Pod]bool{}
	var out []*Pod
	for _, p := range s.pods {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Namespace != out[j].Namespace {
			return out[i].Namespace < out[j].Namespace
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// Problems returns what Compile skipped and why.
func (s *Snapshot) Problems() []string { return slices.Clone(s.problems) }

// Generation returns the snapshot's generation; every Compile makes a
// greater one.
func (s *Snapshot) Generation() uint64 { return s.gen }

// podInfo is a pod as the compiler sees it.
type podInfo struct {
	ns, name string
	labels   labels.Set
	addrs    []netip.Addr
	ports    []corev1.ContainerPort
	local    bool
}

// compiler holds one Compile's indexes.
type compiler struct {
	in       Input
	pods     []*podInfo
	nsLabels map[string]labels.Set
	problems []string
	// selects caches each policy's pod selector; peerCache each rule's
	// peers, by policy, direction and rule index: every local pod a
	// policy selects shares them.
	selects   map[*networkingv1.NetworkPolicy]labels.Selector
	peerCache map[peerKey]peerSet
}

type peerKey struct {
	pol  *networkingv1.NetworkPolicy
	d    Direction
	rule int
}

// Compile compiles in into a snapshot. prev, the snapshot it replaces (or
// nil), lends its owners to the same pods and its per-policy counters to
// the same policies, so that tracker shares and counters carry on. Compile never fails: what it cannot use (an invalid
// selector, CIDR or address) it skips and lists in Problems; a policy
// whose pod selector is invalid selects no pod.
func Compile(in Input, prev *Snapshot) *Snapshot {
	c := &compiler{in: in, nsLabels: map[string]labels.Set{},
		selects: map[*networkingv1.NetworkPolicy]labels.Selector{}, peerCache: map[peerKey]peerSet{}}
	for _, n := range in.Namespaces {
		if n == nil {
			continue
		}
		l := labels.Set{}
		for k, v := range n.Labels {
			l[k] = v
		}
		l["kubernetes.io/metadata.name"] = n.Name
		c.nsLabels[n.Name] = l
	}
	seenAddr := map[netip.Addr]bool{}
	for _, p := range in.Pods {
		if p == nil || p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		pi := &podInfo{ns: p.Namespace, name: p.Name, labels: labels.Set(p.Labels),
			local: in.NodeName == "" || p.Spec.NodeName == in.NodeName}
		ips := p.Status.PodIPs
		if len(ips) == 0 && p.Status.PodIP != "" {
			ips = []corev1.PodIP{{IP: p.Status.PodIP}}
		}
		for _, ip := range ips {
			a, err := netip.ParseAddr(ip.IP)
			if err != nil || a.Zone() != "" {
				c.problem("pod %s/%s: address %q: not an IP address", p.Namespace, p.Name, ip.IP)
				continue
			}
			a = a.Unmap()
			if seenAddr[a] {
				c.problem("pod %s/%s: address %s: used by another pod too", p.Namespace, p.Name, a)
				continue
			}
			seenAddr[a] = true
			pi.addrs = append(pi.addrs, a)
		}
		for _, ctr := range p.Spec.Containers {
			for _, port := range ctr.Ports {
				if port.Name != "" {
					pi.ports = append(pi.ports, port)
				}
			}
		}
		if _, ok := c.nsLabels[p.Namespace]; !ok {
			c.nsLabels[p.Namespace] = labels.Set{"kubernetes.io/metadata.name": p.Namespace}
		}
		c.pods = append(c.pods, pi)
	}

	owners := map[string]*Owner{}
	stats := newDenyStats()
	if prev != nil {
		for _, m := range []map[netip.Addr]*Pod{prev.pods, prev.remote} {
			for _, p := range m {
				owners[p.owner.key] = p.owner
			}
		}
		stats = prev.stats
	}
	s := &Snapshot{
		gen:       generations.Add(1),
		pods:      map[netip.Addr]*Pod{},
		remote:    map[netip.Addr]*Pod{},
		nodeAddrs: slices.Clone(in.NodeAddrs),
		services:  slices.Clone(in.ServiceCIDRs),
		stats:     stats,
	}
	sc := stats.begin(s.gen)
	for _, pi := range c.pods {
		if len(pi.addrs) == 0 {
			continue
		}
		key := pi.ns + "/" + pi.name
		o := owners[key]
		if o == nil {
			o = &Owner{key: key}
		}
		p := &Pod{Namespace: pi.ns, Name: pi.name, owner: o}
		into := s.pods
		if pi.local {
			for d := range p.tables {
				p.tables[d] = c.table(pi, Direction(d), &p.policies[d])
				if p.tables[d] != nil {
					p.groups[d] = sc.group(Direction(d), p.policies[d])
				}
			}
		} else if p.tables[Egress] = c.table(pi, Egress, &p.policies[Egress]); p.tables[Egress] != nil {
			// Its egress only, counted against no policy: the
			// policies' counts are of local pods.
			into = s.remote
		} else {
			continue
		}
		for _, a := range pi.addrs {
			into[a] = p
		}
	}
	sc.finish()
	slices.Sort(c.problems)
	s.problems = slices.Compact(c.problems)
	return s
}

func (c *compiler) problem(format string, args ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, args...))
}

// selector converts a label selector; nil selects nothing, as
// metav1.LabelSelectorAsSelector does.
func (c *compiler) selector(what string, sel *metav1.LabelSelector) labels.Selector {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		c.problem("%s: %v", what, err)
		return labels.Nothing()
	}
	return s
}

// types returns whether pol restricts ingress and egress (its policyTypes,
// or by default ingress always and egress when it has egress rules).
func types(pol *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(pol.Spec.PolicyTypes) == 0 {
		return true, len(pol.Spec.Egress) > 0
	}
	for _, t := range pol.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}

// table compiles pod's rules in direction d, or returns nil when no policy
// selects it for d. names gets the selecting policies' names.
func (c *compiler) table(pod *podInfo, d Direction, names *[]string) *Table {
	var items []item
	selected := false
	for _, pol := range c.in.Policies {
		if pol == nil || pol.Namespace != pod.ns {
			continue
		}
		ing, eg := types(pol)
		if (d == Ingress && !ing) || (d == Egress && !eg) {
			continue
		}
		name := pol.Namespace + "/" + pol.Name
		sel, ok := c.selects[pol]
		if !ok {
			sel = c.selector("policy "+name+": podSelector", &pol.Spec.PodSelector)
			c.selects[pol] = sel
		}
		if !sel.Matches(pod.labels) {
			continue
		}
		selected = true
		*names = append(*names, name)
		if d == Ingress {
			for i, r := range pol.Spec.Ingress {
				items = c.ingressRule(items, name, pod, c.cachedPeers(pol, d, i, r.From), r.Ports)
			}
		} else {
			for i, r := range pol.Spec.Egress {
				items = c.egressRule(items, name, c.cachedPeers(pol, d, i, r.To), r.Ports)
			}
		}
	}
	if !selected {
		return nil
	}
	sort.Strings(*names)
	return buildTable(items)
}

// peerSet is what a rule's peers resolve to: pods, and address ranges
// (ipBlocks, or everything for an empty list).
type peerSet struct {
	pods   []*podInfo
	ranges []addrRange
}

var everything = []addrRange{
	prefixRange(netip.MustParsePrefix("0.0.0.0/0")),
	prefixRange(netip.MustParsePrefix("::/0")),
}

func (c *compiler) cachedPeers(pol *networkingv1.NetworkPolicy, d Direction, rule int, peers []networkingv1.NetworkPolicyPeer) peerSet {
	k := peerKey{pol, d, rule}
	if ps, ok := c.peerCache[k]; ok {
		return ps
	}
	ps := c.peers(pol.Namespace+"/"+pol.Name, pol.Namespace, peers)
	c.peerCache[k] = ps
	return ps
}

func (c *compiler) peers(polName, polNS string, peers []networkingv1.NetworkPolicyPeer) peerSet {
	if len(peers) == 0 {
		return peerSet{ranges: everything}
	}
	var ps peerSet
	for i, p := range peers {
		what := fmt.Sprintf("policy %s: peer %d", polName, i)
		if p.IPBlock != nil {
			ps.ranges = append(ps.ranges, c.ipBlock(what, p.IPBlock)...)
			continue
		}
		if p.PodSelector == nil && p.NamespaceSelector == nil {
			c.problem("%s: empty", what)
			continue
		}
		podSel := labels.Everything()
		if p.PodSelector != nil {
			podSel = c.selector(what+": podSelector", p.PodSelector)
		}
		var nsSel labels.Selector
		if p.NamespaceSelector != nil {
			nsSel = c.selector(what+": namespaceSelector", p.NamespaceSelector)
		}
		for _, pod := range c.pods {
			if nsSel == nil {
				if pod.ns != polNS {
					continue
				}
			} else if !nsSel.Matches(c.nsLabels[pod.ns]) {
				continue
			}
			if podSel.Matches(pod.labels) {
				ps.pods = append(ps.pods, pod)
			}
		}
	}
	return ps
}

// ipBlock returns b's ranges: its CIDR without the excepted ones.
func (c *compiler) ipBlock(what string, b *networkingv1.IPBlock) []addrRange {
	p, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		c.problem("%s: ipBlock cidr %q: %v", what, b.CIDR, err)
		return nil
	}
	out := []addrRange{prefixRange(p)}
	for _, e := range b.Except {
		ep, err := netip.ParsePrefix(e)
		if err != nil {
			// Denying less than the policy says would open it up:
			// the block is skipped whole.
			c.problem("%s: ipBlock except %q: %v", what, e, err)
			return nil
		}
		cut := prefixRange(ep)
		var next []addrRange
		for _, r := range out {
			next = append(next, r.subtract(cut)...)
		}
		out = next
	}
	return out
}

// numericPorts returns the set of a rule's ports given by number (all of
// them for an empty list) and the named ones.
func (c *compiler) numericPorts(what string, ports []networkingv1.NetworkPolicyPort) (*portSet, []networkingv1.NetworkPolicyPort) {
	if len(ports) == 0 {
		return &portSet{all: true}, nil
	}
	var set portSet
	var named []networkingv1.NetworkPolicyPort
	for _, p := range ports {
		proto, ok := protoNumber(p.Protocol)
		if !ok {
			c.problem("%s: protocol %q: not TCP, UDP or SCTP", what, *p.Protocol)
			continue
		}
		switch {
		case p.Port == nil:
			set.ranges = append(set.ranges, portRange{proto: proto, lo: 0, hi: 65535})
		case p.Port.Type == intstr.String:
			named = append(named, p)
		default:
			lo := p.Port.IntVal
			hi := lo
			if p.EndPort != nil {
				hi = *p.EndPort
			}
			if lo < 1 || lo > 65535 || hi < lo || hi > 65535 {
				c.problem("%s: ports %d-%d: out of range", what, lo, hi)
				continue
			}
			set.ranges = append(set.ranges, portRange{proto: proto, lo: uint16(lo), hi: uint16(hi)})
		}
	}
	u := union(&set)
	return &u, named
}

// namedPorts resolves named ports against pod's container ports.
func namedPorts(named []networkingv1.NetworkPolicyPort, pod *podInfo) *portSet {
	var set portSet
	for _, n := range named {
		proto, _ := protoNumber(n.Protocol)
		for _, cp := range pod.ports {
			cproto, ok := protoNumber(&cp.Protocol)
			if ok && cp.Name == n.Port.StrVal && cproto == proto && cp.ContainerPort >= 1 && cp.ContainerPort <= 65535 {
				set.ranges = append(set.ranges, portRange{proto: proto, lo: uint16(cp.ContainerPort), hi: uint16(cp.ContainerPort)})
			}
		}
	}
	if len(set.ranges) == 0 {
		return nil
	}
	u := union(&set)
	return &u
}

func protoNumber(p *corev1.Protocol) (uint8, bool) {
	if p == nil || *p == "" {
		return ProtoTCP, true
	}
	switch *p {
	case corev1.ProtocolTCP:
		return ProtoTCP, true
	case corev1.ProtocolUDP:
		return ProtoUDP, true
	case corev1.ProtocolSCTP:
		return ProtoSCTP, true
	}
	return 0, false
}

// ingressRule adds the items of one ingress rule of pod (the destination:
// named ports resolve against its container ports).
func (c *compiler) ingressRule(items []item, polName string, pod *podInfo, peers peerSet, ports []networkingv1.NetworkPolicyPort) []item {
	num, named := c.numericPorts("policy "+polName, ports)
	set := num
	if n := namedPorts(named, pod); n != nil {
		u := union(num, n)
		set = &u
	}
	if !set.all && len(set.ranges) == 0 {
		return items
	}
	for _, r := range peers.ranges {
		items = append(items, item{r: r, ports: set})
	}
	for _, p := range peers.pods {
		for _, a := range p.addrs {
			items = append(items, item{r: addrRangeOf(a), ports: set})
		}
	}
	return items
}

// egressRule adds the items of one egress rule: named ports resolve
// against each destination pod's container ports (pods in an address range
// peer included); an address without a known pod has no named port.
func (c *compiler) egressRule(items []item, polName string, peers peerSet, ports []networkingv1.NetworkPolicyPort) []item {
	num, named := c.numericPorts("policy "+polName, ports)
	hasNum := num.all || len(num.ranges) > 0
	if hasNum {
		for _, r := range peers.ranges {
			items = append(items, item{r: r, ports: num})
		}
	}
	addPod := func(p *podInfo, a netip.Addr) {
		set := num
		if n := namedPorts(named, p); n != nil {
			u := union(num, n)
			set = &u
		} else if !hasNum {
			return
		}
		items = append(items, item{r: addrRangeOf(a), ports: set})
	}
	for _, p := range peers.pods {
		for _, a := range p.addrs {
			addPod(p, a)
		}
	}
	if len(named) > 0 {
		for _, r := range peers.ranges {
			for _, p := range c.pods {
				for _, a := range p.addrs {
					if r.contains(a) {
						addPod(p, a)
					}
				}
			}
		}
	}
	return items
}
