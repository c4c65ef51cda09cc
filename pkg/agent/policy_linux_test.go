package agent

import (
	"context"
	"encoding/json"
	"io"
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
//
// Both kinds of kernel pod: on TAP links the router judges every packet;
// on veth links the host's kernel forwards them and queues the first
// packet of each new connection to the router (package router,
// hostpolicy_linux.go).
func TestKubeNetworkPolicy(t *testing.T) {
	for _, veth := range []bool{false, true} {
		name := map[bool]string{false: "tap", true: "veth"}[veth]
		t.Run(name, func(t *testing.T) { testKubeNetworkPolicy(t, veth) })
	}
}

func testKubeNetworkPolicy(t *testing.T, veth bool) {
	e := newEnv(t)
	client := twoPodCluster()
	cfg := e.config()
	cfg.NodeName = "self"
	r := e.startWith(t, cfg, WithKubeClient(client))
	var a, b *pod
	if veth {
		a = r.newVethPodAs(t, e.host, "pod-a", "default", "pod-pod-a")
		b = r.newVethPodAs(t, e.host, "pod-b", "default", "pod-pod-b")
	} else {
		a = r.newTapPod(t, "pod-a", true)
		b = r.newTapPod(t, "pod-b", true)
	}
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
	if _, err := pols.Create(ctx, denyB(), metav1.CreateOptions{}); err != nil {
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
	// The router tracks a TAP link's connections; the host's kernel a
	// veth link's.
	if v := metricValue(t, base, "shm_cni_policy_tracked_connections",
		map[string]string{"namespace": "default", "pod": "pod-pod-a"}); !veth && v < 1 {
		t.Errorf("pod a's tracked connections %v, want at least 1 (the one to b it opened)", v)
	} else if veth && v != 0 {
		t.Errorf("pod a's tracked connections %v, want 0 (the host's kernel tracks a veth link's)", v)
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

// denyB is the policy default/deny-b: pod b (app=b) takes nothing in.
func denyB() *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "deny-b"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
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

// TestVethPolicyCutsConnection: a connection between two pods on veth
// links, open and tracked by the host's kernel, stops both ways once a new
// policy denies it (the router revokes it and deletes it from the host's
// connection tracking table), and carries on, its bytes intact, once a
// later policy allows it again.
func TestVethPolicyCutsConnection(t *testing.T) {
	e := newEnv(t)
	client := twoPodCluster()
	cfg := e.config()
	cfg.NodeName = "self"
	r := e.startWith(t, cfg, WithKubeClient(client))
	a := r.newVethPodAs(t, e.host, "pod-a", "default", "pod-pod-a")
	b := r.newVethPodAs(t, e.host, "pod-b", "default", "pod-pod-b")
	ln := listenIn(t, b.ns, b.addr(true))
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := dialFrom(a.ns, netip.MustParseAddrPort(ln.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var s net.Conn
	select {
	case s = <-accepted:
	case <-time.After(callTimeout):
		t.Fatal("b accepted no connection")
	}
	defer s.Close()
	// through sends one byte from a to b and reports whether it arrived
	// within wait.
	through := func(v byte, wait time.Duration) bool {
		t.Helper()
		if _, err := c.Write([]byte{v}); err != nil {
			t.Fatalf("a writes: %v", err)
		}
		buf := make([]byte, 1)
		s.SetReadDeadline(time.Now().Add(wait))
		if _, err := io.ReadFull(s, buf); err != nil {
			return false
		}
		if buf[0] != v {
			t.Fatalf("b read %d, want %d", buf[0], v)
		}
		return true
	}
	if !through(1, callTimeout) {
		t.Fatal("a's byte did not reach b before any policy")
	}
	base := "http://" + r.MetricsAddr().String()
	pols := client.NetworkingV1().NetworkPolicies("default")
	ctx := context.Background()
	if _, err := pols.Create(ctx, denyB(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitIngressPolicies(t, base, "default", "pod-pod-b", "default/deny-b")
	// The walk after the snapshot is asynchronous: the connection is cut
	// once a byte stops getting through.
	guard := time.After(callTimeout)
	for v := byte(2); through(v, deniedDial); v++ {
		select {
		case <-guard:
			t.Fatal("the connection carried on under a policy that denies it")
		default:
		}
	}
	// Still cut: the byte a sent (and TCP's retransmissions of it) stay
	// dropped, and b's own segments too.
	if _, err := s.Write([]byte{0xee}); err != nil {
		t.Fatalf("b writes: %v", err)
	}
	buf := make([]byte, 1)
	c.SetReadDeadline(time.Now().Add(deniedDial))
	if _, err := c.Read(buf); err == nil {
		t.Errorf("a read %#x from b on the cut connection", buf[0])
	}
	if v := metricValue(t, base, "shm_cni_policy_denied_packets_total",
		map[string]string{"namespace": "default", "pod": "pod-pod-b", "direction": "ingress"}); v < 1 {
		t.Errorf("pod b's denied ingress packets %v, want at least 1", v)
	}
	if v := metricValue(t, base, "shm_cni_policy_revoked_connections_total", nil); v < 1 {
		t.Errorf("revoked connections %v, want at least 1", v)
	}
	if v := metricValue(t, base, "shm_cni_policy_queued_packets_total", map[string]string{"verdict": "drop"}); v < 1 {
		t.Errorf("queued packets dropped %v, want at least 1 (the cut connection's)", v)
	}
	if err := pols.Delete(ctx, "deny-b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitIngressPolicies(t, base, "default", "pod-pod-b")
	// TCP retransmits what was dropped: the byte a sent while cut, then
	// b's, arrive, in order.
	s.SetReadDeadline(time.Now().Add(truthRetry))
	if _, err := io.ReadFull(s, buf); err != nil {
		t.Fatalf("b read nothing once the policy was deleted: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(truthRetry))
	if _, err := io.ReadFull(c, buf); err != nil || buf[0] != 0xee {
		t.Fatalf("a read %#x, %v once the policy was deleted; want 0xee", buf[0], err)
	}
}
