// Package policy enforces Kubernetes NetworkPolicy (networking.k8s.io/v1)
// in the router every pod packet crosses: it compiles policies, pods and
// namespaces into per-pod tables.
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
// is allocated and no string is compared. A Snapshot is immutable:
// recompiling builds a new one, which readers swap in.
package policy
