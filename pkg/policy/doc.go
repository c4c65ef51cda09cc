// Package policy enforces Kubernetes NetworkPolicy (networking.k8s.io/v1)
// in the router every pod packet crosses: it compiles policies, pods and
// namespaces into per-pod tables, tracks the connections it allows, and
// decides packet by packet.
//
// # Use
//
//	enf, err := policy.NewEnforcer(policy.DefaultTrackerConfig, nodeGateways)
//	snap := policy.Compile(policy.Input{Policies: ..., Pods: ..., Namespaces: ...,
//		NodeName: node, NodeAddrs: ..., ServiceCIDRs: ...}, enf.Snapshot())
//	enf.Set(snap)        // on every change; nil: no policy at all
//	ok := enf.FromPod(ip)    // a packet a local pod sent
//	ok = enf.FromUplink(ip)  // a packet from the host or beyond
//
// The router calls FromPod and FromUplink (package router); the agent
// compiles and sets snapshots. For the pods the host's kernel forwards
// (veth links), the host queues the router the first packet of each
// connection it does not track, which FromHostLink judges without tracking
// it (the kernel does), and the router revokes (Revoke) the connections
// the kernel tracks that a new snapshot denies (Allows).
//
// # Model
//
// A Snapshot holds, for every address of every local pod, the pod's
// Table for each direction, or nil for a direction in which no policy
// selects it (the pod is not isolated in it: everything passes, as
// Kubernetes says). A policy selects the pods of its namespace its
// podSelector matches, for the directions of its policyTypes (by default
// ingress, and egress when it has egress rules). Selected with no rule, a
// pod is denied everything in that direction (default deny). The rules of
// every policy selecting a pod are unioned.
//
// A rule's peers are pods (podSelector in the policy's namespace,
// namespaceSelector in every namespace it matches, both: the pods matching
// the one in the namespaces matching the other), ipBlocks (a CIDR without
// its excepts), or, for an empty list, every address. Its ports are TCP,
// UDP or SCTP port numbers, ranges (endPort), whole protocols (no port),
// or names: a named port is resolved against the destination pod's
// container ports, pod by pod (for ingress the selected pod, for egress
// each peer pod; an address no known pod has has no named port). No
// ports: every protocol and port, ICMP included. Label selectors are
// Kubernetes' own (metav1.LabelSelectorAsSelector); an invalid one selects
// nothing and is listed in Snapshot.Problems. Host-network pods and pods
// that ended are neither selected nor peers.
//
// A Table is built by a sweep over the address ranges every rule allows:
// disjoint sorted spans, each with the union of the port sets of the rules
// covering it. A verdict is a map read (the local pod by address), a
// binary search over the spans and a walk over a few port ranges; nothing
// is allocated and no string is compared. A Snapshot is immutable: the
// Enforcer publishes it through an atomic pointer; the packet path loads
// it once per packet (nil: no policy, nothing else is done).
//
// # Connection tracking
//
// A connection either of whose local pods is isolated is tracked once
// allowed (TCP, UDP, SCTP by ports, ICMP echo by identifier, any other
// protocol by its addresses), so that its replies pass both ways, and ICMP
// errors about it too. A connection no isolated pod takes part in is not
// tracked. The Tracker is a sharded table (256 locks) bounded by
// TrackerConfig: MaxConns in all, PodShare charged to one pod (the local
// pod that opened the connection, or the local pod it was for), so that a
// pod flooding new flows replaces its own unanswered ones and never takes
// another pod's room. Entries expire after a timeout of their state (TCP
// established 6 h, closing 10 s, unanswered 30 s, answered UDP and SCTP
// 120 s, ICMP echo 30 s); inserts sweep a few entries for expired ones.
//
// # Fragments
//
// A datagram larger than a link's MTU crosses in fragments, and only the
// first carries ports. The first is judged as any packet; when it passes,
// its datagram (addresses, protocol, IP identification) is remembered for
// 30 s (Linux's reassembly timeout; 4096 datagrams, the oldest forgotten
// first) and its later fragments pass too. A later fragment of a datagram
// not remembered is judged by its addresses and protocol: only a rule of
// every port lets it through.
//
// # Policy changes
//
// Every Compile makes a new generation. A tracked connection remembers the
// generation it was allowed under; its first packet under a newer
// snapshot checks its opening tuple against the new rules: still allowed,
// it carries on untouched (no packet is lost); newly denied, it is marked
// denied and its packets are dropped from then on, both ways, until it
// falls silent for its timeout (a later snapshot that allows it again lets
// it resume). The mark is kept rather than the entry removed: a packet of
// the connection would otherwise be judged afresh as one opened by the
// other side, which policy may allow. A pod that becomes isolated while a
// connection of its is open has that connection picked up: a TCP segment
// without SYN that is not tracked passes and is tracked when either the
// connection it belongs to, or the one the other way, may open (without a
// SYN it opens nothing); a datagram is judged as a new flow the way it
// goes. A SYN on a tracked tuple from the side that did not open it is
// judged afresh.
//
// # Counters and the debug log
//
// A denied packet counts against the local pod it was denied for, in its
// direction (Enforcer.Counts), and against every policy isolating that
// pod in that direction (Enforcer.PolicyCounts): NetworkPolicy is an
// allow list, so each of them could have allowed it and none did. That
// costs one atomic add, however many policies select the pod: pods
// selected by the same set of policies share a counter, split among the
// policies when read. Per-pod and per-policy counters carry on through
// snapshots while the pod or the policy exists. A packet is denied for
// the pod whose rules deny it (a packet between two local pods: the
// sender's egress first); a packet of a connection denied after it
// opened, for the pod whose rules deny its opening packet; one whose
// headers do not parse or an ICMP error about nothing tracked, for its
// isolated sender's egress, else its receiver's ingress.
//
// With Enforcer.LogDenials and a logger at debug level, each denied
// packet logs a line: its flow, the pod and direction, the policies
// isolating the pod there, and the reason (DenyReason: no rule allows it,
// with the peer's or the ports' mismatch; connection denied earlier;
// untracked ICMP error; headers do not parse; tracker full, for a
// connection policy allowed but the tracker had no room for). At most
// DenyLogRate lines a second, the next line saying how many were
// suppressed. Off, a denied packet costs one atomic load more.
//
// # Host, node and Services
//
// Traffic from the node's addresses to a local pod is always allowed in
// (kubelet's probes; Kubernetes asks for it). Pod traffic to the node is
// judged as any other egress. Service addresses (Input.ServiceCIDRs) are
// translated by the host after the router, so a pod's packets to one skip
// the egress check there (they are tracked, so the Service's replies come
// back). Translated to a local pod they come back through the uplink from
// the client's own address (package router sends the replies back through
// the host), and meet the client's egress rules and the backend's ingress
// rules there. Translated to a pod of another node they meet, on that
// node, the backend's ingress rules and the client's egress rules: a
// snapshot holds the egress tables of the pods of other nodes that policy
// isolates for egress, applied to their connections to local pods (and
// their connections with local pods are tracked, so that the replies to a
// local pod's connection pass). A Service that picks the client itself
// reaches it from the node gateway (kube-proxy masquerades it, or the pod
// would drop its own address as a source), let in as node traffic: as
// Kubernetes wants it, a pod cannot block access to itself.
package policy
