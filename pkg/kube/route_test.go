package kube

import (
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// node builds a Node with pod CIDRs and addresses ("10.0.0.1" InternalIP,
// "ext:1.2.3.4" ExternalIP).
// hangGuard bounds how long a broken test waits; no test passes or fails on
// how fast something happened.
const hangGuard = 2 * time.Minute

func node(name string, cidrs []string, addrs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR = cidrs[0]
	}
	for _, a := range addrs {
		typ := corev1.NodeInternalIP
		if s, ok := strings.CutPrefix(a, "ext:"); ok {
			typ, a = corev1.NodeExternalIP, s
		}
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: typ, Address: a})
	}
	return n
}

func routes(s ...string) []Route {
	out := make([]Route, len(s))
	for i, r := range s {
		var err error
		if out[i], err = ParseRoute(r); err != nil {
			panic(err)
		}
	}
	return out
}

// TestDesiredRoutes: every other node's pod CIDRs via its InternalIP of
// the same family; skipped with a reason: self, nodes without CIDRs or
// address, overlaps with this node's or an earlier node's CIDRs.
func TestDesiredRoutes(t *testing.T) {
	self := node("a", []string{"10.244.0.0/24", "fd00:10:244::/64"}, "192.0.2.1", "2001:db8::1")
	for _, tc := range []struct {
		name     string
		nodes    []*corev1.Node
		want     []Route
		problems []string
	}{
		{
			name:  "dual stack peers",
			nodes: []*corev1.Node{self, node("c", []string{"10.244.2.0/24", "fd00:10:244:2::/64"}, "192.0.2.3", "2001:db8::3"), node("b", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, "2001:db8::2", "ext:203.0.113.2", "192.0.2.2")},
			want:  routes("10.244.1.0/24=192.0.2.2", "10.244.2.0/24=192.0.2.3", "fd00:10:244:1::/64=2001:db8::2", "fd00:10:244:2::/64=2001:db8::3"),
		},
		{
			name:     "no pod CIDR yet",
			nodes:    []*corev1.Node{self, node("b", nil, "192.0.2.2")},
			problems: []string{"node b: no pod CIDR yet"},
		},
		{
			name:     "only an ExternalIP, no IPv6 address",
			nodes:    []*corev1.Node{self, node("b", []string{"10.244.1.0/24"}, "ext:192.0.2.2"), node("c", []string{"10.244.2.0/24", "fd00:10:244:2::/64"}, "192.0.2.3")},
			want:     routes("10.244.2.0/24=192.0.2.3"),
			problems: []string{"node b: no InternalIP of pod CIDR 10.244.1.0/24's family", "node c: no InternalIP of pod CIDR fd00:10:244:2::/64's family"},
		},
		{
			name:     "overlapping own and another node's",
			nodes:    []*corev1.Node{self, node("b", []string{"10.244.0.0/16"}, "192.0.2.2"), node("c", []string{"10.245.1.0/24"}, "192.0.2.3"), node("d", []string{"10.245.1.0/25"}, "192.0.2.4")},
			want:     routes("10.245.1.0/24=192.0.2.3"),
			problems: []string{"node b: pod CIDR 10.244.0.0/16 overlaps this node's 10.244.0.0/24: not routed", "node d: pod CIDR 10.245.1.0/25 overlaps node c's 10.245.1.0/24: not routed"},
		},
		{
			name:     "unparsable pod CIDR",
			nodes:    []*corev1.Node{self, node("b", []string{"10.244.1.1/24"}, "192.0.2.2")},
			problems: []string{`node b: pod CIDR "10.244.1.1/24" is not a masked prefix`},
		},
		{
			name:  "self absent from the list",
			nodes: []*corev1.Node{node("b", []string{"10.244.1.0/24"}, "192.0.2.2")},
			want:  routes("10.244.1.0/24=192.0.2.2"),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := DesiredRoutes("a", tc.nodes)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("routes %v, want %v", got, tc.want)
			}
			if fmt.Sprint(problems) != fmt.Sprint(tc.problems) {
				t.Errorf("problems %q, want %q", problems, tc.problems)
			}
		})
	}
}

// TestParseRoute: CIDR=GATEWAY, refused when malformed, unmasked, of mixed
// families or with a gateway that cannot be one.
func TestParseRoute(t *testing.T) {
	for _, tc := range []struct {
		in, want, err string
	}{
		{in: "10.245.0.0/24=192.0.2.2", want: "10.245.0.0/24=192.0.2.2"},
		{in: " fd00::/64 = 2001:db8::2 ", want: "fd00::/64=2001:db8::2"},
		{in: "10.245.0.0/24", err: "is not CIDR=GATEWAY"},
		{in: "10.245.0.1/24=192.0.2.2", err: "not a masked"},
		{in: "10.245.0.0/24=2001:db8::2", err: "different families"},
		{in: "10.245.0.0/24=0.0.0.0", err: "not a unicast address"},
		{in: "10.245.0.0/24=224.0.0.1", err: "not a unicast address"},
		{in: "10.245.0.0/24=fe80::1%eth0", err: "not an IPv4 or IPv6 address"},
		{in: "x=192.0.2.2", err: "x=192.0.2.2"},
	} {
		r, err := ParseRoute(tc.in)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("ParseRoute(%q): %v", tc.in, err)
		case tc.err == "" && r.String() != tc.want:
			t.Errorf("ParseRoute(%q) = %s, want %s", tc.in, r, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("ParseRoute(%q) error %v, want one containing %q", tc.in, err, tc.err)
		}
	}
	var l RouteList
	if err := l.Set("10.245.1.0/24=192.0.2.2,,fd00:1::/64=2001:db8::2"); err != nil {
		t.Fatal(err)
	}
	if err := l.Set("10.245.2.0/24=192.0.2.3"); err != nil {
		t.Fatal(err)
	}
	if got, want := l.String(), "10.245.1.0/24=192.0.2.2,fd00:1::/64=2001:db8::2,10.245.2.0/24=192.0.2.3"; got != want {
		t.Errorf("RouteList %s, want %s", got, want)
	}
}

// TestMergeRoutes: static routes win over learned ones they overlap.
func TestMergeRoutes(t *testing.T) {
	got, problems := MergeRoutes(routes("10.245.0.0/16=192.0.2.9"), routes("10.244.1.0/24=192.0.2.2", "10.245.3.0/24=192.0.2.3"))
	if want := routes("10.244.1.0/24=192.0.2.2", "10.245.0.0/16=192.0.2.9"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("merged %v, want %v", got, want)
	}
	if len(problems) != 1 || !strings.Contains(problems[0].Error(), "10.245.3.0/24") {
		t.Errorf("problems %v, want the overlapped 10.245.3.0/24", problems)
	}
}

// TestRoutingChanged: a Node update triggers a route sync only when its pod
// CIDRs or addresses changed, or on the informer's resync (same object).
func TestRoutingChanged(t *testing.T) {
	base := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n", ResourceVersion: "1"},
		Spec:       corev1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24"}},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.1"}}},
	}
	change := func(f func(n *corev1.Node)) *corev1.Node {
		n := base.DeepCopy()
		n.ResourceVersion = "2"
		f(n)
		return n
	}
	for _, tc := range []struct {
		name string
		cur  *corev1.Node
		want bool
	}{
		{"resync", base.DeepCopy(), true},
		{"heartbeat", change(func(n *corev1.Node) {
			n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
		}), false},
		{"pod CIDRs", change(func(n *corev1.Node) { n.Spec.PodCIDRs = append(n.Spec.PodCIDRs, "fd00::/64") }), true},
		{"address", change(func(n *corev1.Node) { n.Status.Addresses[0].Address = "192.0.2.2" }), true},
	} {
		if got := routingChanged(base, tc.cur); got != tc.want {
			t.Errorf("%s: routingChanged = %t, want %t", tc.name, got, tc.want)
		}
	}
}
