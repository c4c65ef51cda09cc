package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// deniedDial is how long a connection NetworkPolicy denies is given to
// open anyway: a denied SYN gets no answer, so the dial ends with this
// timeout. Not a hang guard: an allowed connection opens well within it
// (one round trip in the router), and a failure is what the test wants.
const deniedDial = 2 * time.Second

// TestKubeNetworkPolicy: an agent given a Kubernetes client enforces the
// cluster's NetworkPolicy on its pods: a default-deny ingress policy on
// pod b stops pod a's connections to it (counted in /metrics), an allow
// policy for a's label lets them open, and deleting both opens b again;
// /policy names the policies selecting b. The API has no address of the
// pods: they come from the agent's attachments.
//
// The API server is client-go's fake clientset: no API server runs here
// (tier 3, test/e2e/cri/tier3-k8s.sh, runs this against a real one). The
// agent, its informers, the router and the pods' kernel stacks are real.
func TestKubeNetworkPolicy(t *testing.T) {
	e := newEnv(t)
	client := twoPodCluster()
	cfg := e.config()
	cfg.NodeName = "self"
	r := e.startWith(t, cfg, WithKubeClient(client))
	a := r.newTapPod(t, "pod-a", true)
	b := r.newTapPod(t, "pod-b", true)
	ln := listenIn(t, b.ns, b.addr(true))
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dst := netip.MustParseAddrPort(ln.Addr().String())
	dial := func() error {
		var c net.Conn
		err := a.ns.Do(func(_ ns.NetNS) error {
			var err error
			c, err = (&net.Dialer{Timeout: deniedDial}).Dial("tcp", dst.String())
			return err
		})
		if err == nil {
			c.Close()
		}
		return err
	}
	base := "http://" + r.MetricsAddr().String()
	waitPolicies := func(want ...string) { t.Helper(); waitIngressPolicies(t, base, "default", "pod-pod-b", want...) }
	waitPolicies()
	if err := dial(); err != nil {
		t.Fatalf("a -> b without policy: %v", err)
	}

	pols := client.NetworkingV1().NetworkPolicies("default")
	ctx := context.Background()
	deny := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "deny-b"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	}
	if _, err := pols.Create(ctx, deny, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPolicies("default/deny-b")
	if err := dial(); err == nil {
		t.Error("a -> b connected under a default-deny ingress policy on b")
	}
	denied := metricValue(t, base, "shm_cni_policy_denied_packets_total",
		map[string]string{"namespace": "default", "pod": "pod-pod-b", "direction": "ingress"})
	if denied < 1 {
		t.Errorf("pod b's denied ingress packets %v, want at least 1 (a's SYN)", denied)
	}
	denyB := map[string]string{"namespace": "default", "networkpolicy": "deny-b", "direction": "ingress"}
	byPolicy := metricValue(t, base, "shm_cni_networkpolicy_denied_packets_total", denyB)
	if byPolicy < denied {
		t.Errorf("deny-b's denied ingress packets %v, want pod b's %v (it is the one policy isolating b)", byPolicy, denied)
	}

	allow := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "allow-a"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
			}}}},
		},
	}
	if _, err := pols.Create(ctx, allow, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPolicies("default/allow-a", "default/deny-b")
	if err := dial(); err != nil {
		t.Errorf("a -> b with a policy allowing a: %v", err)
	}
	if v := metricValue(t, base, "shm_cni_networkpolicy_denied_packets_total", denyB); v < byPolicy {
		t.Errorf("deny-b's denied ingress packets %v after a new snapshot, want at least %v as before", v, byPolicy)
	}
	_, body := httpGet(t, base+"/policy?namespace=default&pod=pod-pod-b")
	var st PolicyStatus
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("GET /policy: %v: %s", err, body)
	}
	if len(st.Policies) != 2 || st.Policies[1].Name != "deny-b" || st.Policies[1].DeniedIngress == nil ||
		float64(*st.Policies[1].DeniedIngress) < byPolicy || st.Policies[1].DeniedEgress != nil {
		t.Errorf("/policy's policies: %s; want allow-a and deny-b, deny-b's denied ingress at least %v", body, byPolicy)
	}
	if v := metricValue(t, base, "shm_cni_policy_tracked_connections",
		map[string]string{"namespace": "default", "pod": "pod-pod-a"}); v < 1 {
		t.Errorf("pod a's tracked connections %v, want at least 1 (the one to b it opened)", v)
	}

	for _, n := range []string{"deny-b", "allow-a"} {
		if err := pols.Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitPolicies()
	if err := dial(); err != nil {
		t.Errorf("a -> b once the policies are deleted: %v", err)
	}
}

// twoPodCluster is a fake clientset's cluster: the node "self" with the
// agent's IPv4 pod CIDR, the namespace default and two pods of the node
// without addresses, pod-pod-a (app=a) and pod-pod-b (app=b): newTapPod's
// pod names for the containers pod-a and pod-b.
func twoPodCluster() *fake.Clientset {
	apiPod := func(name, app string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Labels: map[string]string{"app": app}},
			Spec:       corev1.PodSpec{NodeName: "self"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning},
		}
	}
	return fake.NewClientset(
		&corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "self"},
			Spec:       corev1.NodeSpec{PodCIDR: podCIDR4.String(), PodCIDRs: []string{podCIDR4.String()}},
		},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default"}},
		apiPod("pod-pod-a", "a"), apiPod("pod-pod-b", "b"),
	)
}

// waitIngressPolicies waits until the agent's /policy at base shows want
// as the ingress policies of the local pod namespace/name.
func waitIngressPolicies(t *testing.T, base, namespace, name string, want ...string) {
	t.Helper()
	guard := time.After(callTimeout)
	for {
		_, body := httpGet(t, base+"/policy?namespace="+namespace+"&pod="+name)
		var st PolicyStatus
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			t.Fatalf("GET /policy: %v: %s", err, body)
		}
		if st.Enforced && len(st.Pods) == 1 && slices.Equal(st.Pods[0].Ingress, want) {
			return
		}
		select {
		case <-guard:
			t.Fatalf("pod %s/%s's ingress policies in /policy: %s; want %q", namespace, name, body, want)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// metricValue returns the value of the counter or gauge name with labels
// in the agent's /metrics at base, failing t when it is missing.
func metricValue(t *testing.T, base, name string, labels map[string]string) float64 {
	t.Helper()
	code, body := httpGet(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d", code)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse metrics: %v", err)
	}
metrics:
	for _, m := range fams[name].GetMetric() {
		for _, l := range m.GetLabel() {
			if v, ok := labels[l.GetName()]; ok && v != l.GetValue() {
				continue metrics
			}
		}
		if m.Counter != nil {
			return m.GetCounter().GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("%s%v not in /metrics", name, labels)
	return 0
}

// TestKubeRefusesVeth: an agent that enforces a cluster's NetworkPolicy
// refuses a veth link, whose traffic between kernel pods and to the host
// would not cross the router, with code 7 saying why, and keeps nothing
// of it (no attachment, no address taken).
func TestKubeRefusesVeth(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.NodeName = "self"
	r := e.startWith(t, cfg, WithKubeClient(twoPodCluster()))
	x := testutil.NewNS(t)
	_, err := r.call(t, &agentapi.Request{Op: agentapi.OpAttach, Attach: &agentapi.AttachRequest{
		ContainerID: "veth-pod", IfName: "eth0", Netns: x.Path(), Network: "pods",
		Kind: agentapi.KindVeth, MAC: "02:00:00:00:00:01",
	}}, nil)
	var ae *agentapi.Error
	if !errors.As(err, &ae) || ae.Code != agentapi.CodeInvalidConfig || !strings.Contains(ae.Error(), "NetworkPolicy") {
		t.Errorf("attach of kind veth: %v, want code %d naming NetworkPolicy", err, agentapi.CodeInvalidConfig)
	}
	if n := r.count(); n != 0 {
		t.Errorf("%d attachments after the refusal, want none", n)
	}
	// The address the refusal did not take is the first one's.
	p := r.newTapPod(t, "pod-after", true)
	if got, want := p.addr(true), netip.MustParseAddr("10.244.1.2"); got != want {
		t.Errorf("the next pod got %s, want %s (the refusal took an address)", got, want)
	}
}
