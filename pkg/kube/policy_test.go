package kube

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/policy"
)

func testPod(ns, name, node string, lbl map[string]string, ips ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbl},
		Spec:       corev1.PodSpec{NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}

func podIPs(p *corev1.Pod) string {
	var s []string
	for _, ip := range p.Status.PodIPs {
		s = append(s, ip.IP)
	}
	return fmt.Sprintf("%s/%s%v/%s", p.Namespace, p.Name, s, p.Status.PodIP)
}

// TestPolicyPods: this node's pods take the agent's addresses (before the
// API has any, instead of stale ones the API still shows), come first,
// and without an attachment have none; other nodes' pods and host-network
// pods are passed as the API shows them; the API's objects are not
// changed.
func TestPolicyPods(t *testing.T) {
	a := testPod("ns", "a", "n1", nil)                     // attached, no API address yet
	b := testPod("ns", "b", "n1", nil, "10.244.1.9")       // attached, the API's address stale
	gone := testPod("ns", "gone", "n1", nil, "10.244.1.7") // no attachment
	r := testPod("ns", "r", "n2", nil, "10.244.2.5")
	h := testPod("ns", "h", "n1", nil, "192.0.2.1")
	h.Spec.HostNetwork = true
	local := []LocalPod{
		{Namespace: "ns", Name: "a", Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00::5")}},
		{Namespace: "ns", Name: "b", Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.6")}},
		{Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.8")}}, // no pod name: not the kubelet's
	}
	var got []string
	for _, p := range PolicyPods("n1", []*corev1.Pod{r, a, gone, h, b}, local) {
		got = append(got, podIPs(p))
	}
	want := []string{"ns/a[10.244.1.5 fd00::5]/", "ns/b[10.244.1.6]/", "ns/r[10.244.2.5]/10.244.2.5", "ns/h[192.0.2.1]/192.0.2.1"}
	if !slices.Equal(got, want) {
		t.Errorf("PolicyPods:\n got %q\nwant %q", got, want)
	}
	if podIPs(b) != "ns/b[10.244.1.9]/10.244.1.9" {
		t.Errorf("the API's pod changed: %s", podIPs(b))
	}
}

// TestNodeAddrs: internal and external IPs, sorted, once; hostnames and
// junk are not addresses.
func TestNodeAddrs(t *testing.T) {
	n := &corev1.Node{Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
		{Type: corev1.NodeHostName, Address: "n1"},
		{Type: corev1.NodeInternalIP, Address: "192.0.2.1"},
		{Type: corev1.NodeExternalIP, Address: "2001:db8::1"},
		{Type: corev1.NodeExternalIP, Address: "192.0.2.1"},
		{Type: corev1.NodeInternalIP, Address: "not-an-ip"},
	}}}
	if got, want := fmt.Sprint(NodeAddrs(n)), "[192.0.2.1 2001:db8::1]"; got != want {
		t.Errorf("NodeAddrs %s, want %s", got, want)
	}
}

// TestPolicyChanged: the updates that change a snapshot compile, the
// others (a pod's conditions, a node's heartbeat) do not.
func TestPolicyChanged(t *testing.T) {
	pod := testPod("ns", "a", "n1", map[string]string{"app": "a"}, "10.244.1.5")
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ns", Labels: map[string]string{"team": "x"}}}
	n := node("n1", []string{"10.244.1.0/24"}, "192.0.2.1")
	for _, tc := range []struct {
		name string
		old  any
		edit func(any)
		want bool
	}{
		{"pod conditions", pod, func(o any) {
			o.(*corev1.Pod).Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
		}, false},
		{"pod labels", pod, func(o any) { o.(*corev1.Pod).Labels["app"] = "b" }, true},
		{"pod address", pod, func(o any) { o.(*corev1.Pod).Status.PodIPs[0].IP = "10.244.1.6" }, true},
		{"pod scheduled", pod, func(o any) { o.(*corev1.Pod).Spec.NodeName = "n2" }, true},
		{"pod ended", pod, func(o any) { o.(*corev1.Pod).Status.Phase = corev1.PodSucceeded }, true},
		{"namespace annotations", ns, func(o any) { o.(*corev1.Namespace).Annotations = map[string]string{"a": "b"} }, false},
		{"namespace labels", ns, func(o any) { o.(*corev1.Namespace).Labels["team"] = "y" }, true},
		{"node heartbeat", n, func(o any) {
			o.(*corev1.Node).Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
		}, false},
		{"node address", n, func(o any) { o.(*corev1.Node).Status.Addresses[0].Address = "192.0.2.9" }, true},
		{"policy", &networkingv1.NetworkPolicy{}, func(any) {}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cur := tc.old.(interface{ DeepCopyObject() runtime.Object }).DeepCopyObject()
			tc.edit(cur)
			if got := policyChanged(tc.old, cur); got != tc.want {
				t.Errorf("policyChanged = %t, want %t", got, tc.want)
			}
		})
	}
}

// sink is a PolicySink recording its snapshots.
type sink struct {
	snap atomic.Pointer[policy.Snapshot]
}

func (s *sink) SetPolicy(p *policy.Snapshot) { s.snap.Store(p) }
func (s *sink) Policy() *policy.Snapshot     { return s.snap.Load() }

// TestPolicySyncer: the syncer compiles the cluster's policies, pods and
// namespaces, the node's addresses and the agent's local pods into the
// sink's snapshot, and compiles again when a policy is added or deleted,
// a remote pod's labels change, and the agent says its pods changed.
//
// The API server is client-go's fake clientset: no API server runs here
// (tier 3, test/e2e/cri/tier3-k8s.sh, runs this against a real one).
// The informers, the compiler and the snapshots are real.
func TestPolicySyncer(t *testing.T) {
	tcp := uint8(policy.ProtoTCP)
	ip := netip.MustParseAddr
	node := node("n1", []string{"10.244.1.0/24"}, "192.0.2.1")
	denyA := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "deny-a"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	}
	client := fake.NewClientset(node,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default"}},
		testPod("default", "a", "n1", map[string]string{"app": "a"}), // the API has no address yet
		testPod("default", "b", "n2", map[string]string{"app": "b"}, "10.244.2.5"),
		testPod("default", "c", "n1", map[string]string{"app": "a"}),
		denyA,
	)
	var mu sync.Mutex
	local := []LocalPod{{Namespace: "default", Name: "a", Addrs: []netip.Addr{ip("10.244.1.5")}}}
	changed := make(chan struct{}, 1)
	snk := &sink{}
	syncs := make(chan *policy.Snapshot, 64)
	s := &PolicySyncer{
		Client:       client,
		NodeName:     "n1",
		ServiceCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")},
		Local: func() []LocalPod {
			mu.Lock()
			defer mu.Unlock()
			return slices.Clone(local)
		},
		Changed:  changed,
		Sink:     snk,
		Log:      testutil.Logger(t),
		Debounce: time.Millisecond,
		OnSync:   func(p *policy.Snapshot) { syncs <- p },
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})

	// waitFor reads snapshots until ok holds for one, which must be the
	// sink's.
	waitFor := func(what string, ok func(*policy.Snapshot) bool) *policy.Snapshot {
		t.Helper()
		guard := time.After(hangGuard)
		for {
			select {
			case p := <-syncs:
				if ok(p) {
					if cur := snk.Policy(); cur == nil || !ok(cur) {
						t.Fatalf("%s: the sink does not hold the snapshot", what)
					}
					return p
				}
			case <-guard:
				t.Fatalf("%s: no such snapshot", what)
			}
		}
	}
	isolated := func(p *policy.Snapshot, a netip.Addr) []string {
		if pod := p.Pod(a); pod != nil {
			return pod.Policies(policy.Ingress)
		}
		return nil
	}
	p := waitFor("first", func(p *policy.Snapshot) bool { return len(isolated(p, ip("10.244.1.5"))) > 0 })
	if got := isolated(p, ip("10.244.1.5")); !slices.Equal(got, []string{"default/deny-a"}) {
		t.Errorf("pod a's ingress policies %q, want default/deny-a", got)
	}
	if p.Allows(ip("10.244.2.5"), ip("10.244.1.5"), tcp, 80) {
		t.Error("b -> a allowed under a default deny")
	}
	if !p.Allows(ip("192.0.2.1"), ip("10.244.1.5"), tcp, 80) {
		t.Error("the node (its InternalIP) -> a denied: kubelet probes come from there")
	}
	if p.Pod(ip("10.244.2.5")) != nil {
		t.Error("remote pod b is local in the snapshot")
	}
	if len(p.Pods()) != 1 {
		t.Errorf("local pods %d, want 1: c is not attached", len(p.Pods()))
	}

	allowB := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "allow-b"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			}}}},
		},
	}
	pols := client.NetworkingV1().NetworkPolicies("default")
	if _, err := pols.Create(ctx, allowB, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("allow b", func(p *policy.Snapshot) bool { return p.Allows(ip("10.244.2.5"), ip("10.244.1.5"), tcp, 80) })

	// b's label changes: no longer the peer allow-b names.
	b, err := client.CoreV1().Pods("default").Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b.Labels = map[string]string{"app": "other"}
	if _, err := client.CoreV1().Pods("default").Update(ctx, b, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("b relabelled", func(p *policy.Snapshot) bool { return !p.Allows(ip("10.244.2.5"), ip("10.244.1.5"), tcp, 80) })

	// The agent attaches c: the API has no address of it yet.
	mu.Lock()
	local = append(local, LocalPod{Namespace: "default", Name: "c", Addrs: []netip.Addr{ip("10.244.1.6")}})
	mu.Unlock()
	changed <- struct{}{}
	waitFor("c attached", func(p *policy.Snapshot) bool { return len(isolated(p, ip("10.244.1.6"))) == 2 })

	for _, n := range []string{"deny-a", "allow-b"} {
		if err := pols.Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor("no policy", func(p *policy.Snapshot) bool {
		return isolated(p, ip("10.244.1.5")) == nil && isolated(p, ip("10.244.1.6")) == nil &&
			p.Allows(ip("10.244.2.5"), ip("10.244.1.5"), tcp, 80)
	})
}
