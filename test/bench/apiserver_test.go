package main

import (
	"context"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"

	"github.com/shm-cni/shm-cni/pkg/kube"
	"github.com/shm-cni/shm-cni/pkg/policy"
)

// TestListWatchServer checks that client-go's informers, as the agent
// runs them, list and follow what the bench's server serves: the policy
// case's cluster, its policies growing and shrinking.
func TestListWatchServer(t *testing.T) {
	cur, err := ns.GetCurrentNS()
	if err != nil {
		t.Fatal(err)
	}
	defer cur.Close()
	s, err := startListWatchServer(cur)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := s.writeKubeconfig(kc); err != nil {
		t.Fatal(err)
	}
	objs := newPolicyObjects([]string{"a", "b"}, netip.MustParseAddr("10.244.0.1"), 1000)
	if err := objs.set(s, 100); err != nil {
		t.Fatal(err)
	}
	c, err := kube.NewClient(kc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := informers.NewSharedInformerFactory(c, 0)
	defer func() { cancel(); f.Shutdown() }()
	pols := f.Networking().V1().NetworkPolicies()
	pods := f.Core().V1().Pods()
	pols.Informer()
	pods.Informer()
	f.Start(ctx.Done())
	for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
		if !ok {
			t.Fatalf("%v did not sync", typ)
		}
	}
	if l, _ := pods.Lister().List(labels.Everything()); len(l) != remotePods+2 {
		t.Errorf("pods listed: %d, want %d", len(l), remotePods+2)
	}
	for _, n := range []int{100, 1000, 0, 10} {
		if err := objs.set(s, n); err != nil {
			t.Fatal(err)
		}
		guard := time.After(30 * time.Second)
		for {
			l, _ := pols.Lister().List(labels.Everything())
			if len(l) == n {
				break
			}
			select {
			case <-guard:
				t.Fatalf("informer holds %d policies, want %d", len(l), n)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
}

// TestPolicyObjects checks that the policy case's cluster compiles without
// problems and that the policies selecting a measured pod are those
// waitPolicies waits for.
func TestPolicyObjects(t *testing.T) {
	objs := newPolicyObjects([]string{"a", "b"}, netip.MustParseAddr("10.244.0.1"), 1000)
	for _, n := range []int{0, 1, 100, 1000} {
		in := policy.Input{NodeName: benchNode}
		for _, o := range objs.namespaces {
			in.Namespaces = append(in.Namespaces, o.(*corev1.Namespace))
		}
		for i, o := range objs.pods {
			p := o.(*corev1.Pod).DeepCopy()
			if p.Spec.NodeName == benchNode {
				p.Status.PodIPs = []corev1.PodIP{{IP: netip.AddrFrom4([4]byte{10, 244, 0, byte(10 + i)}).String()}}
			}
			in.Pods = append(in.Pods, p)
		}
		in.Policies = objs.policies[:n]
		s := policy.Compile(in, nil)
		if p := s.Problems(); len(p) > 0 {
			t.Errorf("%d policies: problems %q", n, p)
		}
		pa := s.Pod(netip.AddrFrom4([4]byte{10, 244, 0, 10}))
		if pa == nil {
			t.Fatalf("%d policies: pod a not local", n)
		}
		got := [2]int{len(pa.Policies(policy.Ingress)), len(pa.Policies(policy.Egress))}
		if got != objs.selecting[n] {
			t.Errorf("%d policies: a is selected by %v (ingress, egress), want %v", n, got, objs.selecting[n])
		}
	}
}
