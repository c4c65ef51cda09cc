// Package router is the node agent's userspace L3 router: one gVisor netstack
// that forwards IPv4 and IPv6 between pod links and an uplink TUN device in
// the host network namespace.
//
// # Model
//
// Every pod gets /32 and /128 addresses from the node's pod CIDRs and a
// default route to a link-local gateway (169.254.1.1 and fe80::1) that the
// router answers on every pod link (ARP, NDP, ICMP echo). The router knows
// each pod's MAC, so it never resolves pod addresses. Everything not
// addressed to a pod leaves through the uplink, a TUN device (shm0 by
// default) in the host network namespace; the host routes the pod CIDRs to
// that device and owns the node gateway addresses (the first usable address
// of each pod CIDR, see [NodeGateway]). Egress that leaves the cluster is
// masqueraded by an nftables table ("shm-cni", inet family) in the host
// namespace. So that a host firewall whose forward policy is drop does not
// drop the pod traffic crossing the host, the router accepts exactly that
// traffic in the host's forward path (iptables FORWARD and DOCKER-USER,
// nftables forward chains; hostfw_linux.go), checks it and its masquerade
// table every Config.HostCheckInterval and puts back what another program
// removed (hostcheck_linux.go). Traffic for a pod CIDR address that has no
// link is dropped and counted by the router instead of being sent back to
// the host, which would route it to the uplink again.
//
// # Use
//
//	r, err := router.New(cfg, log) // in the host network namespace
//	err = r.Start()                  // uplink TUN, host routes, nftables
//	err = r.AddLink(id, ep, router.Link{Addrs: ..., PodMAC: ...})
//	st, err := r.LinkStats(id)
//	r.SetPolicy(snap)                // NetworkPolicy (package policy); nil: none
//	err = r.RemoveLink(id)
//	err = r.Close()                  // removes everything Start and AddLink made
//
// New records the calling thread's network namespace as the host namespace;
// every later host-side operation (TUN, netlink, nftables) targets that
// namespace explicitly, so the methods may be called from any goroutine. The
// netstack itself belongs to no namespace.
//
// # Link endpoints
//
// AddLink takes any stack.LinkEndpoint. The router relies on this contract,
// which is what gVisor's stack.RemoveNIC does to an endpoint (read in the
// pinned gVisor sources): RemoveNIC disables the NIC, then calls
// ep.Attach(nil) and finally ep.Close(); it never calls ep.Wait. The router
// therefore calls ep.Wait itself after RemoveNIC. An endpoint must stop its
// worker goroutines on Attach(nil) (or Close) and Wait must return once they
// have stopped. When RemoveLink returns, the endpoint is detached, closed and
// quiescent, and the caller may release what backs it (for example close its
// file descriptor). The endpoint is never used again by the router.
//
// What a pod sends meets NetworkPolicy after the anti-spoofing filter, and
// what comes from the uplink for a pod meets it in the uplink's wrapper
// (policy.go). The packets of host links (AddHostLink), which the host's
// kernel forwards, meet it there: the host queues the first packet of each
// of their connections policy must judge to the router's enforcer
// (hostpolicy_linux.go).
//
// The router wraps every endpoint (gVisor's link/nested) to work around a
// use-after-free in the pinned gVisor's IPv4 forwarding; see forwardhold.go.
// The wrapper passes Attach, Close, Wait and GSO through to the endpoint.
//
// The package is Linux only (network namespaces, TUN, netlink, nftables).
package router
