package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/shm-cni/shm-cni/pkg/policy"
)

// DefaultPolicyDebounce is how long a PolicySyncer waits after a change
// before it compiles, so that a burst of changes (a Deployment's pods, a
// namespace's policies applied at once) makes one snapshot. Short beside
// the seconds a pod takes to start; long beside one compile.
const DefaultPolicyDebounce = 150 * time.Millisecond

// PolicySink installs compiled snapshots; *router.Router is one.
type PolicySink interface {
	SetPolicy(*policy.Snapshot)
	// Policy returns the installed snapshot (or nil), which the next
	// Compile takes as its predecessor.
	Policy() *policy.Snapshot
}

// LocalPod is a pod attached on this node, with the addresses the agent
// gave it.
type LocalPod struct {
	Namespace, Name string
	Addrs           []netip.Addr
}

// PolicySyncer keeps a PolicySink's NetworkPolicy snapshot in step with
// the cluster: it watches NetworkPolicies, Pods and Namespaces (all of
// them: remote pods are peers of local ones) and this node's Node (its
// addresses, from which kubelet probes come), and compiles a snapshot
// after every change.
type PolicySyncer struct {
	// Client reads NetworkPolicies, Pods, Namespaces and the Node (list
	// and watch). Required.
	Client kubernetes.Interface
	// NodeName is this node's name: its pods are the local ones.
	// Required.
	NodeName string
	// ServiceCIDRs are the cluster's Service address ranges
	// (policy.Input.ServiceCIDRs).
	ServiceCIDRs []netip.Prefix
	// Local returns the pods attached on this node and their addresses,
	// which are theirs before the API server reports them. Required.
	Local func() []LocalPod
	// Changed, when it delivers, makes the syncer compile again: the
	// agent signals a changed Local there.
	Changed <-chan struct{}
	// Sink receives the snapshots. Required.
	Sink PolicySink
	// Log receives what Compile skipped and the informers' progress.
	// Required.
	Log *slog.Logger
	// Debounce is the wait after a change; 0 means DefaultPolicyDebounce.
	Debounce time.Duration
	// OnSync, if set, is called after every snapshot is installed.
	OnSync func(*policy.Snapshot)
}

// Run compiles and installs a snapshot once the informers' caches are
// filled, then again after every change (debounced; one compile at a
// time), until ctx ends. Until the first snapshot nothing is enforced.
// Its goroutines are gone when it returns.
func (s *PolicySyncer) Run(ctx context.Context) error {
	if s.Client == nil || s.NodeName == "" || s.Local == nil || s.Sink == nil || s.Log == nil {
		return errors.New("policy syncer: Client, NodeName, Local, Sink and Log are required")
	}
	debounce := s.Debounce
	if debounce == 0 {
		debounce = DefaultPolicyDebounce
	}
	ctx, cancel := context.WithCancel(ctx)
	// No periodic resync: a snapshot depends on the objects only, and
	// every change of one is an event.
	factory := informers.NewSharedInformerFactory(s.Client, 0)
	self := informers.NewSharedInformerFactoryWithOptions(s.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", s.NodeName).String()
		}))
	// Shutdown waits for the informers' goroutines, which end with ctx.
	defer func() {
		cancel()
		factory.Shutdown()
		self.Shutdown()
	}()
	kick := make(chan struct{}, 1)
	trigger := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { trigger() },
		UpdateFunc: func(old, cur any) {
			if policyChanged(old, cur) {
				trigger()
			}
		},
		DeleteFunc: func(any) { trigger() },
	}
	pols := factory.Networking().V1().NetworkPolicies()
	pods := factory.Core().V1().Pods()
	nss := factory.Core().V1().Namespaces()
	nodes := self.Core().V1().Nodes()
	for _, inf := range []cache.SharedIndexInformer{pols.Informer(), pods.Informer(), nss.Informer(), nodes.Informer()} {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("policy syncer: %w", err)
		}
	}
	factory.Start(ctx.Done())
	self.Start(ctx.Done())
	for _, f := range []informers.SharedInformerFactory{factory, self} {
		for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("policy syncer: %v cache did not sync", typ)
			}
		}
	}
	s.Log.Info("policy informers synced", "node", s.NodeName)

	trigger()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		case <-s.Changed:
		}
		// Fold in what arrives meanwhile.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(debounce):
		}
		select {
		case <-s.Changed:
		default:
		}
		select {
		case <-kick:
		default:
		}
		in, err := s.input(pols.Lister(), pods.Lister(), nss.Lister(), nodes.Lister())
		if err != nil {
			return fmt.Errorf("policy syncer: %w", err)
		}
		snap := policy.Compile(in, s.Sink.Policy())
		s.Sink.SetPolicy(snap)
		s.logSnapshot(snap)
		if s.OnSync != nil {
			s.OnSync(snap)
		}
	}
}

// input reads the listers into a policy.Input.
func (s *PolicySyncer) input(pols networkinglisters.NetworkPolicyLister, pods corelisters.PodLister,
	nss corelisters.NamespaceLister, nodes corelisters.NodeLister) (policy.Input, error) {
	in := policy.Input{NodeName: s.NodeName, ServiceCIDRs: s.ServiceCIDRs}
	var err error
	if in.Policies, err = pols.List(labels.Everything()); err != nil {
		return in, fmt.Errorf("list network policies: %w", err)
	}
	if in.Namespaces, err = nss.List(labels.Everything()); err != nil {
		return in, fmt.Errorf("list namespaces: %w", err)
	}
	podList, err := pods.List(labels.Everything())
	if err != nil {
		return in, fmt.Errorf("list pods: %w", err)
	}
	in.Pods = PolicyPods(s.NodeName, podList, s.Local())
	nodeList, err := nodes.List(labels.Everything())
	if err != nil {
		return in, fmt.Errorf("list nodes: %w", err)
	}
	for _, n := range nodeList {
		if n.Name == s.NodeName {
			in.NodeAddrs = NodeAddrs(n)
		}
	}
	return in, nil
}

// logSnapshot logs what Compile skipped, and at debug level which
// policies select each local pod.
func (s *PolicySyncer) logSnapshot(snap *policy.Snapshot) {
	for _, p := range snap.Problems() {
		s.Log.Warn("network policy skipped", "reason", p)
	}
	if !s.Log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	for _, p := range snap.Pods() {
		s.Log.Debug("network policy snapshot", "generation", snap.Generation(), "pod", p.Namespace+"/"+p.Name,
			"ingress", p.Policies(policy.Ingress), "egress", p.Policies(policy.Egress))
	}
}

// PolicyPods returns the pods to compile: the API's (their labels, ports,
// node), with the addresses of this node's pods replaced by the agent's
// (local), as package policy asks. A local pod's addresses are the
// agent's from its attachment on, before the kubelet reports them to the
// API server; a pod of this node without an attachment has none, so that
// an address the API still shows for a pod that is gone (and the agent
// may have given to another) is not taken for it. An attachment whose pod
// the API has not shown yet waits for it (its labels are unknown). Local
// pods come first: on an address two pods claim, Compile keeps the first.
func PolicyPods(node string, api []*corev1.Pod, local []LocalPod) []*corev1.Pod {
	byName := make(map[string][]netip.Addr, len(local))
	for _, l := range local {
		if l.Namespace == "" || l.Name == "" {
			continue // not a pod the kubelet attached
		}
		k := l.Namespace + "/" + l.Name
		byName[k] = append(byName[k], l.Addrs...)
	}
	out := make([]*corev1.Pod, 0, len(api))
	var remote []*corev1.Pod
	for _, p := range api {
		if p.Spec.NodeName != node || p.Spec.HostNetwork {
			remote = append(remote, p)
			continue
		}
		addrs, ok := byName[p.Namespace+"/"+p.Name]
		if !ok {
			continue // not attached (yet, or any more): no address of its
		}
		c := p.DeepCopy()
		c.Status.PodIP = ""
		c.Status.PodIPs = nil
		for _, a := range addrs {
			c.Status.PodIPs = append(c.Status.PodIPs, corev1.PodIP{IP: a.String()})
		}
		out = append(out, c)
	}
	return append(out, remote...)
}

// policyChanged reports whether an update of an object the syncer watches
// changes what Compile sees: a pod's labels, node, host network, phase or
// addresses (its container ports cannot change), a namespace's labels, the
// Node's addresses, any change of a NetworkPolicy. The pods' status
// updates (conditions, container states) compile nothing.
func policyChanged(old, cur any) bool {
	switch o := old.(type) {
	case *corev1.Pod:
		n, ok := cur.(*corev1.Pod)
		return !ok || !maps.Equal(o.Labels, n.Labels) || o.Spec.NodeName != n.Spec.NodeName ||
			o.Spec.HostNetwork != n.Spec.HostNetwork || o.Status.Phase != n.Status.Phase ||
			o.Status.PodIP != n.Status.PodIP || !slices.Equal(o.Status.PodIPs, n.Status.PodIPs)
	case *corev1.Namespace:
		n, ok := cur.(*corev1.Namespace)
		return !ok || !maps.Equal(o.Labels, n.Labels)
	case *corev1.Node:
		n, ok := cur.(*corev1.Node)
		return !ok || !slices.Equal(o.Status.Addresses, n.Status.Addresses)
	}
	return true
}

// NodeAddrs returns the Node's IP addresses (InternalIP, ExternalIP),
// sorted, without duplicates.
func NodeAddrs(n *corev1.Node) []netip.Addr {
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Zone() == "" {
			out = append(out, ip.Unmap())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}
