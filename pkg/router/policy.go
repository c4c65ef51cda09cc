package router

import (
	"fmt"
	"log/slog"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/policy"
)

// NetworkPolicy in the router (package policy says what it decides).
//
// Every packet a pod sends passes its link's filter (filter.go): the
// anti-spoofing checks first, then the policy enforcer, before the fast
// path or gVisor's forwarding sees it. So one check covers a packet between
// two pods of this node (the sender's egress rules and the receiver's
// ingress rules at once, whichever path forwards it) and a packet from a
// pod to the host or beyond (its egress rules). Every packet from the host
// or beyond passes the uplink's policy endpoint, which checks those for a
// local pod against its ingress rules. Packets the router itself sends
// (ARP, NDP, echo replies, ICMP errors) and packets for it are not judged.
// Traffic from the node's own addresses to a pod is always let in (kubelet
// probes): the node gateways are given to the enforcer here, the node's
// other addresses come with the snapshot (policy.Input.NodeAddrs).
//
// Without a snapshot (SetPolicy(nil), the default) a packet costs one
// atomic load.

// policyHeaderBytes is how much of a packet the enforcer reads: the IP
// headers and an ICMP error's quoted headers (IPv6 40 + 8 ICMPv6 + 40 + a
// few extension headers + 8 ports; 192 leaves room for options).
const policyHeaderBytes = 192

// SetPolicy installs a compiled policy snapshot; nil removes every policy.
// Connections tracked under the previous snapshot are checked against the
// new one at their next packet: those it still allows carry on, the others
// stop.
func (r *Router) SetPolicy(s *policy.Snapshot) {
	r.policy.Set(s)
	if h := r.hostPol.Load(); h != nil {
		h.setPolicy(s)
	}
	r.inForce.Store(s)
}

// Policy returns the policy snapshot in force, or nil: the one SetPolicy
// installed last, once it returned. Until then the host may still let a
// veth link's new connection through without queueing it to the router
// (its sets of isolated addresses are updated after the enforcer's
// snapshot), so the agent's /policy and metrics, which report this one,
// never say a policy is enforced before it is.
func (r *Router) Policy() *policy.Snapshot {
	return r.inForce.Load()
}

// PolicyCounts returns the policy counters of the installed snapshot's
// local pods: packets denied by direction, connections refused for want
// of tracker room, connections tracked.
func (r *Router) PolicyCounts() []policy.PodCounts {
	return r.policy.Counts()
}

// NetworkPolicyCounts returns the packets denied against each policy
// isolating a local pod, by direction.
func (r *Router) NetworkPolicyCounts() []policy.PolicyCounts {
	return r.policy.PolicyCounts()
}

// newPolicyEnforcer returns the router's enforcer: no policy yet, the
// default tracker limits, the node gateways let in; with log at debug
// level, a rate-limited line for every packet it denies
// (policy.Enforcer.LogDenials).
func newPolicyEnforcer(cfg Config, log *slog.Logger) (*policy.Enforcer, error) {
	var nodes []netip.Addr
	for _, p := range cfg.PodCIDRs {
		gw, _ := NodeGateway(p) // checked by Config.Validate
		nodes = append(nodes, gw)
	}
	e, err := policy.NewEnforcer(policy.DefaultTrackerConfig, nodes)
	if err != nil {
		return nil, fmt.Errorf("policy enforcer: %w", err)
	}
	e.LogDenials(log)
	return e, nil
}

// policyAllows reports whether pkt, an IP packet of protocol (not ARP),
// passes enforce: fromPod or from the uplink. It reads the headers only
// when a snapshot is installed.
func policyAllows(e *policy.Enforcer, fromPod bool, protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	if e.Snapshot() == nil {
		return true
	}
	if protocol != header.IPv4ProtocolNumber && protocol != header.IPv6ProtocolNumber {
		return true
	}
	b, ok := pkt.Data().PullUp(min(pkt.Data().Size(), policyHeaderBytes))
	if !ok {
		return true // empty: the stack drops it
	}
	if fromPod {
		return e.FromPod(b)
	}
	return e.FromUplink(b)
}

// policyEndpoint wraps the uplink's endpoint: packets from the host or
// beyond for a local pod meet the pod's ingress rules.
type policyEndpoint struct {
	nested.Endpoint
	// policy is the router's enforcer. Immutable.
	policy *policy.Enforcer
}

var _ stack.LinkEndpoint = (*policyEndpoint)(nil)
var _ stack.NetworkDispatcher = (*policyEndpoint)(nil)

func newPolicyEndpoint(ep stack.LinkEndpoint, e *policy.Enforcer) *policyEndpoint {
	p := &policyEndpoint{policy: e}
	p.Endpoint.Init(ep, p)
	return p
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (p *policyEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if !policyAllows(p.policy, false, protocol, pkt) {
		return
	}
	p.Endpoint.DeliverNetworkPacket(protocol, pkt)
}
