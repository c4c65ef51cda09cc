// Package kube connects the shm-cni node agent to Kubernetes: it keeps the
// host's routes to the other nodes' pod CIDRs and feeds the router's
// NetworkPolicy.
//
// Pod CIDRs: a node's pod CIDRs are its Node object's spec.podCIDRs
// (NodePodCIDRs); WaitPodCIDRs waits until the controller manager has
// allocated them.
//
// Routes ("host-gw"): every other node's pod CIDRs are routed via that
// node's InternalIP of the same family. DesiredRoutes computes them from a
// plain Node list; a Reconciler makes the host's main routing table match a
// route list with netlink, touching only routes tagged with RouteProtocol,
// so routes of anyone else are never removed. RouteSyncer drives a
// Reconciler from a Node informer; the agent's static --peer-routes (a
// RouteList) go through the same Reconciler when there is no API server.
//
// NetworkPolicy: PolicySyncer watches the cluster's NetworkPolicies, Pods
// and Namespaces and this node's Node, compiles them with package policy
// (PolicyPods puts the agent's own addresses on this node's pods) and
// installs each snapshot in a PolicySink, the router.
package kube
