package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	gipv4 "gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	gipv6 "gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	gicmp "gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/waiter"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/policy"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// The truth table's timing. Neither decides a pass or a failure by speed:
// truthNoAnswer is how long a probe waits before it takes silence for
// "no connection" (what a denied flow gets: the router drops it without
// an answer); a probe expected to connect that got no answer in that time
// is asked again with truthRetry, so that a loaded machine shows as slow,
// not as a denial. A denied flow that connects is a failure at once.
const (
	truthNoAnswer = 1500 * time.Millisecond
	truthRetry    = 20 * time.Second
	// truthParallel is how many probes run at once.
	truthParallel = 128
)

// truthPod is a pod of the truth table, as the API and the node see it.
type truthPod struct {
	ns, name string
	labels   map[string]string
	ports    []corev1.ContainerPort
	sandbox  bool
	// veth: a kernel pod on a veth link (the host's kernel forwards its
	// packets; policy judges them through the host's queue); else on a
	// TAP link.
	veth bool
	// Set once attached: addrs by family (0 IPv4, 1 IPv6), and the
	// kernel pod's namespace or the sandbox's netstack.
	addrs [2]netip.Addr
	tap   *pod
	sb    *sandbox
}

// truthEnd is one end of a probe: a pod, the node, or a host beyond it.
type truthEnd struct {
	name string
	pod  *truthPod
	// node is set for the node; host is the node's or the outside
	// host's namespace (pod nil).
	node  bool
	host  ns.NetNS
	addrs [2]netip.Addr
}

// truthProbe is a protocol and port a probe tries.
type truthProbe struct {
	proto corev1.Protocol
	port  uint16
}

func (p truthProbe) String() string {
	if p.proto == truthICMP {
		return "ping"
	}
	return strings.ToLower(string(p.proto)) + "/" + fmt.Sprint(p.port)
}

// truthICMP stands for ICMP echo (ping) in a truthProbe: no port; only a
// rule without ports lets it through.
const truthICMP corev1.Protocol = "ICMP"

// truthProbes are the ports every pod and the node listen on, and every
// probe tries: the named ports "http" of the three apps (80, 8080, 9090)
// and UDP 53 ("dns" of two of them); and ping, which every stack answers.
var truthProbes = []truthProbe{
	{corev1.ProtocolTCP, 80}, {corev1.ProtocolTCP, 8080}, {corev1.ProtocolTCP, 9090}, {corev1.ProtocolUDP, 53},
	{truthICMP, 0},
}

var truthFamilies = []string{"IPv4", "IPv6"}

// truthPods are the table's pods: two namespaces, kernel pods (TAP) and
// sandboxes (shared memory) in each, three apps whose named port "http"
// is a different number each (80, 8080, 9090).
func truthPods() []*truthPod {
	web := []corev1.ContainerPort{{Name: "http", ContainerPort: 80}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}
	db := []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}
	client := []corev1.ContainerPort{{Name: "http", ContainerPort: 9090}}
	return []*truthPod{
		{ns: "alpha", name: "web-k", labels: map[string]string{"app": "web"}, ports: web},
		{ns: "alpha", name: "web-s", labels: map[string]string{"app": "web"}, ports: web, sandbox: true},
		{ns: "alpha", name: "db-k", labels: map[string]string{"app": "db"}, ports: db},
		{ns: "beta", name: "web-s", labels: map[string]string{"app": "web"}, ports: web, sandbox: true},
		{ns: "beta", name: "cli-k", labels: map[string]string{"app": "client"}, ports: client},
		{ns: "alpha", name: "db-v", labels: map[string]string{"app": "db"}, ports: db, veth: true},
		{ns: "beta", name: "cli-v", labels: map[string]string{"app": "client"}, ports: client, veth: true},
	}
}

// truthNamespaces are the namespaces' labels (until a set relabels them).
var truthNamespaces = map[string]map[string]string{
	"alpha": {"team": "a"},
	"beta":  {"team": "b"},
}

// truthSet is a set of policies the table is probed under. Its policies
// are made once the pods have addresses (ipBlocks name them); the first
// is created first.
type truthSet struct {
	name     string
	policies func(pods map[string]*truthPod, node truthEnd) []*networkingv1.NetworkPolicy
	// relabel gives namespaces and pods (namespace/name) new labels
	// before the policies are made; they keep them for the later sets.
	relabel map[string]map[string]string
	// witness names the ends of a flow (IPv4, the first probe port)
	// whose verdict a namespace's new labels change: the snapshot must
	// agree with the model on it before the probes (the namespaces'
	// informer is not ordered with the policies').
	witness *[2]string
}

// Shorthands for the sets' policies.
func tpPolicy(namespace, name string, sel map[string]string, types []networkingv1.PolicyType,
	in []networkingv1.NetworkPolicyIngressRule, out []networkingv1.NetworkPolicyEgressRule) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: sel},
			PolicyTypes: types, Ingress: in, Egress: out,
		},
	}
}

var (
	tpIngress = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	tpEgress  = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	tpBoth    = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
)

func tpPods(l map[string]string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: l}}
}

func tpNamespaces(l map[string]string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: &metav1.LabelSelector{MatchLabels: l}}
}

func tpPodsIn(nsl, pl map[string]string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{
		NamespaceSelector: &metav1.LabelSelector{MatchLabels: nsl},
		PodSelector:       &metav1.LabelSelector{MatchLabels: pl},
	}
}

func tpBlock(cidr netip.Prefix, except ...netip.Prefix) networkingv1.NetworkPolicyPeer {
	b := &networkingv1.IPBlock{CIDR: cidr.String()}
	for _, e := range except {
		b.Except = append(b.Except, e.String())
	}
	return networkingv1.NetworkPolicyPeer{IPBlock: b}
}

func tpHost(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// tpPort is a port by number (0: the whole protocol), to end when end > 0.
func tpPort(proto corev1.Protocol, port, end int32) networkingv1.NetworkPolicyPort {
	p := networkingv1.NetworkPolicyPort{Protocol: &proto}
	if port != 0 {
		v := intstr.FromInt32(port)
		p.Port = &v
	}
	if end != 0 {
		p.EndPort = &end
	}
	return p
}

func tpNamed(proto corev1.Protocol, name string) networkingv1.NetworkPolicyPort {
	v := intstr.FromString(name)
	return networkingv1.NetworkPolicyPort{Protocol: &proto, Port: &v}
}

type (
	tpIn  = networkingv1.NetworkPolicyIngressRule
	tpOut = networkingv1.NetworkPolicyEgressRule
	tpPr  = networkingv1.NetworkPolicyPeer
	tpPt  = networkingv1.NetworkPolicyPort
)

var (
	tpTCP = corev1.ProtocolTCP
	tpUDP = corev1.ProtocolUDP
)

// truthSets are the policy sets, probed in this order.
var truthSets = []truthSet{
	{name: "no policy", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy { return nil }},
	{name: "default deny ingress in alpha; a policy selecting no pod in beta", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			// Would deny beta's pods everything, if it selected one.
			tpPolicy("beta", "selects-none", map[string]string{"app": "none"}, tpBoth, nil, nil),
			tpPolicy("alpha", "deny-ingress", nil, tpIngress, nil, nil),
		}
	}},
	{name: "default deny egress in beta", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{tpPolicy("beta", "deny-egress", nil, tpEgress, nil, nil)}
	}},
	{name: "podSelector: alpha's web from alpha's db on TCP 80", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{tpPolicy("alpha", "web-from-db", map[string]string{"app": "web"}, nil,
			[]tpIn{{From: []tpPr{tpPods(map[string]string{"app": "db"})}, Ports: []tpPt{tpPort(tpTCP, 80, 0)}}}, nil)}
	}},
	{name: "namespaceSelector: alpha's db from beta; beta only to alpha (by its name label)", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "db-from-beta", map[string]string{"app": "db"}, nil,
				[]tpIn{{From: []tpPr{tpNamespaces(map[string]string{"team": "b"})}}}, nil),
			tpPolicy("beta", "to-alpha", nil, tpEgress, nil,
				[]tpOut{{To: []tpPr{tpNamespaces(map[string]string{"kubernetes.io/metadata.name": "alpha"})}}}),
		}
	}},
	{name: "namespaceSelector and podSelector together: alpha's db from beta's web, or alpha's web on UDP", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{tpPolicy("alpha", "db-from-beta-web", map[string]string{"app": "db"}, nil,
			[]tpIn{
				{From: []tpPr{tpPodsIn(map[string]string{"team": "b"}, map[string]string{"app": "web"})}},
				{From: []tpPr{tpPods(map[string]string{"app": "web"})}, Ports: []tpPt{tpPort(tpUDP, 0, 0)}},
			}, nil)}
	}},
	{name: "ipBlock with except: beta's egress; alpha's db from an IPv4 block", policies: func(p map[string]*truthPod, node truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("beta", "egress-blocks", nil, tpEgress, nil, []tpOut{{To: []tpPr{
				tpBlock(podCIDR4, tpHost(p["alpha/web-k"].addrs[0])),
				tpBlock(podCIDR6, tpHost(p["alpha/web-s"].addrs[1]), tpHost(node.addrs[1])),
			}}}),
			tpPolicy("alpha", "db-from-block", map[string]string{"app": "db"}, tpIngress, []tpIn{{From: []tpPr{
				tpBlock(netip.MustParsePrefix("10.244.0.0/16"), tpHost(p["alpha/web-s"].addrs[0])),
			}}}, nil),
		}
	}},
	{name: "ipBlock beyond the cluster: alpha from the outside network but its IPv6 host, out to everything but 10.0.0.0/8 and 2001:db8::/32", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "outside-only", nil, tpBoth,
				[]tpIn{{From: []tpPr{
					tpBlock(truthOutside4.Masked()),
					tpBlock(truthOutside6.Masked(), tpHost(truthOutside6.Addr())),
				}}},
				[]tpOut{{To: []tpPr{
					tpBlock(netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("10.0.0.0/8")),
					tpBlock(netip.MustParsePrefix("::/0"), netip.MustParsePrefix("2001:db8::/32")),
				}}}),
		}
	}},
	{name: "empty selectors: beta out to every pod of every namespace (not the node, not beyond); alpha's web typed egress only, its ingress rule ignored", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("beta", "to-all-pods", nil, tpEgress, nil, []tpOut{{To: []tpPr{tpNamespaces(nil)}}}),
			tpPolicy("alpha", "web-egress-only", map[string]string{"app": "web"}, tpEgress,
				[]tpIn{{From: []tpPr{tpPods(map[string]string{"app": "db"})}}},
				[]tpOut{{To: []tpPr{tpPodsIn(map[string]string{}, map[string]string{"app": "web"})}}}),
		}
	}},
	{name: "named ports: into alpha on http and dns, out of beta to http", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "named-in", nil, nil, []tpIn{{Ports: []tpPt{tpNamed(tpTCP, "http"), tpNamed(tpUDP, "dns")}}}, nil),
			tpPolicy("beta", "named-out", nil, tpEgress, nil, []tpOut{{Ports: []tpPt{tpNamed(tpTCP, "http")}}}),
		}
	}},
	{name: "named port to an ipBlock: beta out to IPv4 pod addresses on http", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("beta", "named-to-block", nil, tpEgress, nil,
				[]tpOut{{To: []tpPr{tpBlock(podCIDR4)}, Ports: []tpPt{tpNamed(tpTCP, "http")}}}),
		}
	}},
	{name: "matchExpressions: alpha's pods but web from beta's pods not client, and from app in (db, client) on TCP 9090", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		notWeb := tpPolicy("alpha", "not-web", nil, nil, []tpIn{
			{From: []tpPr{{
				NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
					{Key: "team", Operator: metav1.LabelSelectorOpIn, Values: []string{"b"}}}},
				PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
					{Key: "app", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"client"}}}},
			}}},
			{From: []tpPr{{PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
				{Key: "app", Operator: metav1.LabelSelectorOpIn, Values: []string{"db", "client"}}}}}},
				Ports: []tpPt{tpPort(tpTCP, 9090, 0)}},
		}, nil)
		notWeb.Spec.PodSelector = metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
			{Key: "app", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"web"}}}}
		return []*networkingv1.NetworkPolicy{notWeb}
	}},
	{name: "endPort: alpha's db on TCP 8000-8100 and UDP 50-60; beta's client out to TCP 9000-9999", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "db-ranges", map[string]string{"app": "db"}, nil,
				[]tpIn{{Ports: []tpPt{tpPort(tpTCP, 8000, 8100), tpPort(tpUDP, 50, 60)}}}, nil),
			tpPolicy("beta", "client-range", map[string]string{"app": "client"}, nil, nil,
				[]tpOut{{Ports: []tpPt{tpPort(tpTCP, 9000, 9999)}}}),
		}
	}},
	{name: "TCP and UDP: alpha's web takes UDP only, beta's web TCP 80 only", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "web-udp", map[string]string{"app": "web"}, nil, []tpIn{{Ports: []tpPt{tpPort(tpUDP, 0, 0)}}}, nil),
			tpPolicy("beta", "web-tcp-80", map[string]string{"app": "web"}, nil, []tpIn{{Ports: []tpPt{tpPort(tpTCP, 80, 0)}}}, nil),
		}
	}},
	{name: "both directions: alpha within itself, out to the node on TCP 8080 (IPv4); two policies unioned on beta's web", policies: func(_ map[string]*truthPod, node truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "within", nil, tpBoth,
				[]tpIn{{From: []tpPr{tpPods(nil)}}},
				[]tpOut{{To: []tpPr{tpPods(nil)}}, {To: []tpPr{tpBlock(tpHost(node.addrs[0]))}, Ports: []tpPt{tpPort(tpTCP, 8080, 0)}}}),
			tpPolicy("beta", "web-80", map[string]string{"app": "web"}, nil, []tpIn{{Ports: []tpPt{tpPort(tpTCP, 80, 0)}}}, nil),
			tpPolicy("beta", "web-from-alpha-db", map[string]string{"app": "web"}, nil,
				[]tpIn{{From: []tpPr{tpNamespaces(map[string]string{"team": "a"})}, Ports: []tpPt{tpPort(tpTCP, 8080, 0)}}}, nil),
		}
	}},
	{name: "relabelled (last): beta's team=c, alpha/web-k app=db; alpha's db from team=b, beta out to team=b", policies: func(map[string]*truthPod, truthEnd) []*networkingv1.NetworkPolicy {
		return []*networkingv1.NetworkPolicy{
			tpPolicy("alpha", "db-from-team-b", map[string]string{"app": "db"}, nil,
				[]tpIn{{From: []tpPr{tpNamespaces(map[string]string{"team": "b"})}}}, nil),
			tpPolicy("beta", "to-team-b", nil, tpEgress, nil,
				[]tpOut{{To: []tpPr{tpNamespaces(map[string]string{"team": "b"})}}}),
		}
	}, relabel: map[string]map[string]string{"beta": {"team": "c"}, "alpha/web-k": {"app": "db"}},
		// Within beta: allowed while beta is team=b.
		witness: &[2]string{"beta/cli-k", "beta/web-s"}},
}

// TestPolicyTruthTable probes, with real traffic through a real agent
// (its informers fed by a fake clientset, as TestKubeNetworkPolicy), every
// ordered pair of five pods in two namespaces (kernel pods on TAP links and
// sandboxes on shared-memory links), the node, and a host outside (reached
// through the node, egress to it masqueraded), on TCP 80, 8080, 9090,
// UDP 53 and ping, in IPv4 and IPv6, under each of truthSets: default deny in
// either direction, pod and namespace selectors alone and together
// (matchLabels and matchExpressions, the namespace's name label), ipBlocks
// with excepts (pod addresses, the node, the outside network), named ports
// (a different number per pod; to an ipBlock), port ranges, TCP and UDP,
// policies unioned, a policy selecting no pod, and last a namespace and a
// pod relabelled. Each cell must be exactly what truthModel, an
// independent reading of the NetworkPolicy API written for this test,
// expects: allowed connects (and reaches the right end), denied gets no
// answer. The node reaches every pod under every set (kubelet's probes).
// On a difference the set's whole table is printed.
func TestPolicyTruthTable(t *testing.T) {
	e := newEnv(t)
	pods := truthPods()
	objs := []runtime.Object{&corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "self"},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR4.String(), PodCIDRs: []string{podCIDR4.String(), podCIDR6.String()}},
	}}
	for n, l := range truthNamespaces {
		objs = append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: l}})
	}
	for _, p := range pods {
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: p.ns, Name: p.name, Labels: p.labels},
			Spec:       corev1.PodSpec{NodeName: "self", Containers: []corev1.Container{{Name: "c", Ports: p.ports}}},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning},
		})
	}
	client := fake.NewClientset(objs...)
	cfg := e.config()
	cfg.NodeName = "self"
	r := e.startWith(t, cfg, WithKubeClient(client))

	node := truthEnd{name: "node", node: true, host: e.host}
	for i, c := range []netip.Prefix{podCIDR4, podCIDR6} {
		gw, err := router.NodeGateway(c)
		if err != nil {
			t.Fatal(err)
		}
		node.addrs[i] = gw
	}
	byName := map[string]*truthPod{}
	ends := []truthEnd{}
	for i, p := range pods {
		cid := fmt.Sprintf("truth-%d", i)
		if p.sandbox {
			resp, err := r.tryAttachShmAs(t, cid, p.ns, p.name, queue.DefaultSizes(), 0)
			if err != nil {
				t.Fatalf("attach %s/%s: %v", p.ns, p.name, err)
			}
			if p.sb, err = dialSandbox(t, resp.SocketPath); err != nil {
				t.Fatalf("sandbox %s/%s: %v", p.ns, p.name, err)
			}
			p.addrs = [2]netip.Addr{p.sb.addr(true), p.sb.addr(false)}
		} else if p.veth {
			p.tap = r.newVethPodAs(t, e.host, cid, p.ns, p.name)
			p.addrs = [2]netip.Addr{p.tap.addr(true), p.tap.addr(false)}
		} else {
			p.tap = r.newTapPodAs(t, cid, p.ns, p.name, true)
			p.addrs = [2]netip.Addr{p.tap.addr(true), p.tap.addr(false)}
		}
		byName[p.ns+"/"+p.name] = p
		ends = append(ends, truthEnd{name: p.ns + "/" + p.name, pod: p, addrs: p.addrs})
	}
	outside := truthEnd{name: "outside", host: truthOutside(t, e.host),
		addrs: [2]netip.Addr{truthOutside4.Addr(), truthOutside6.Addr()}}
	ends = append(ends, node, outside)
	for _, end := range ends {
		serveTruth(t, end)
	}

	nsLabels := map[string]map[string]string{}
	for n, l := range truthNamespaces {
		nsLabels[n] = l
	}
	endByName := map[string]truthEnd{}
	for _, e := range ends {
		endByName[e.name] = e
	}
	pols := map[string]bool{} // the policies in the API, as namespace/name
	start := time.Now()
	cells, allowed, wrong := 0, 0, 0
	for _, set := range truthSets {
		ctx := context.Background()
		for k := range pols {
			nsName := strings.SplitN(k, "/", 2)
			if err := client.NetworkingV1().NetworkPolicies(nsName[0]).Delete(ctx, nsName[1], metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			delete(pols, k)
		}
		for k, l := range set.relabel {
			if p := byName[k]; p != nil {
				api, err := client.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				api.Labels, p.labels = l, l
				if _, err := client.CoreV1().Pods(p.ns).Update(ctx, api, metav1.UpdateOptions{}); err != nil {
					t.Fatal(err)
				}
				continue
			}
			api, err := client.CoreV1().Namespaces().Get(ctx, k, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			api.Labels, nsLabels[k] = l, l
			if _, err := client.CoreV1().Namespaces().Update(ctx, api, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		policies := set.policies(byName, node)
		for _, np := range policies {
			if _, err := client.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			pols[np.Namespace+"/"+np.Name] = true
		}
		m := truthModel{policies: policies, nsLabels: nsLabels}
		waitSelection(t, r, pods, m)
		if w := set.witness; w != nil {
			from, to := endByName[w[0]], endByName[w[1]]
			want := m.allows(from, to, 0, truthProbes[0])
			guard := time.After(callTimeout)
			for r.router.Policy().Allows(from.addrs[0], to.addrs[0], policy.ProtoTCP, truthProbes[0].port) != want {
				select {
				case <-guard:
					t.Fatalf("policy set %q: the snapshot never judged %s -> %s as the model does (%v)", set.name, from.name, to.name, want)
				case <-time.After(20 * time.Millisecond):
				}
			}
		}

		table := probeTable(t, ends, m)
		cells += len(table)
		var bad []truthCell
		for _, c := range table {
			if c.got != c.want {
				bad = append(bad, c)
			}
		}
		wrong += len(bad)
		for _, c := range table {
			if c.want {
				allowed++
			}
		}
		if len(bad) > 0 {
			t.Errorf("policy set %q: %d of %d cells differ:\n%s", set.name, len(bad), len(table), renderTruth(ends, table))
		}
	}
	t.Logf("%d cells under %d policy sets (%d allowed, %d denied), %d differ; probed in %v",
		cells, len(truthSets), allowed, cells-allowed, wrong, time.Since(start).Round(time.Second))
}

// waitSelection waits until the agent's /policy view shows the policies
// the model says select each pod in each direction, with nothing skipped:
// the snapshot then holds the set's policies (the informer delivers them
// in the order they were made, and the set's last one selects a pod, but
// for the first set, which has none).
func waitSelection(t *testing.T, r *running, pods []*truthPod, m truthModel) {
	t.Helper()
	guard := time.After(callTimeout)
	for {
		st := r.Policy("", "")
		ok := st.Enforced && len(st.Pods) == len(pods) && len(st.Problems) == 0
		if ok {
			for _, pp := range st.Pods {
				var p *truthPod
				for _, q := range pods {
					if q.ns == pp.Namespace && q.name == pp.Pod {
						p = q
					}
				}
				if p == nil || !slices.Equal(pp.Ingress, m.selecting(p, policyIngress)) || !slices.Equal(pp.Egress, m.selecting(p, policyEgress)) {
					ok = false
				}
			}
		}
		if ok {
			return
		}
		select {
		case <-guard:
			t.Fatalf("the agent's policy view %+v; want the selection of %d policies", st, len(m.policies))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// truthCell is one probe: from an end to another, on a port, in a
// family; want is the model's, got what the network did.
type truthCell struct {
	from, to  int // indexes into ends
	fam       int
	probe     int // index into truthProbes
	want, got bool
}

// probeTable probes every cell of the table in parallel and returns them.
// It fails t on a probe that neither connects to the right end nor times
// out (refused, reset, answered by another end).
func probeTable(t *testing.T, ends []truthEnd, m truthModel) []truthCell {
	t.Helper()
	var cells []truthCell
	for fam := range truthFamilies {
		for i := range ends {
			for j := range ends {
				if i == j {
					continue
				}
				for k := range truthProbes {
					c := truthCell{from: i, to: j, fam: fam, probe: k}
					c.want = m.allows(ends[i], ends[j], fam, truthProbes[k])
					cells = append(cells, c)
				}
			}
		}
	}
	run := func(idx []int, wait time.Duration) {
		sem := make(chan struct{}, truthParallel)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var errs []error
		for _, n := range idx {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				c := &cells[n]
				got, err := ends[c.from].probe(ends[c.to], c.fam, truthProbes[c.probe], wait)
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("%s -> %s %s %s: %w", ends[c.from].name, ends[c.to].name,
						truthFamilies[c.fam], truthProbes[c.probe], err))
					mu.Unlock()
				}
				c.got = got
			}()
		}
		wg.Wait()
		if len(errs) > 0 {
			t.Fatalf("probes failed:\n%v", errors.Join(errs...))
		}
	}
	all := make([]int, len(cells))
	for i := range all {
		all[i] = i
	}
	run(all, truthNoAnswer)
	var again []int
	for i, c := range cells {
		if c.want && !c.got {
			again = append(again, i)
		}
	}
	if len(again) > 0 {
		t.Logf("%d probes expected to connect got no answer in %v; asking again with %v", len(again), truthNoAnswer, truthRetry)
		run(again, truthRetry)
	}
	return cells
}

// renderTruth prints a table per family: a row per source, a column per
// destination, in each cell one mark per probe port (a dash on the
// diagonal): + connected, . no answer (both as the model says), X
// connected but the model denies it, ! no answer but the model allows it.
func renderTruth(ends []truthEnd, cells []truthCell) string {
	marks := map[[3]int][]byte{}
	for _, c := range cells {
		k := [3]int{c.fam, c.from, c.to}
		if marks[k] == nil {
			marks[k] = make([]byte, len(truthProbes))
		}
		var m byte
		switch {
		case c.got && c.want:
			m = '+'
		case !c.got && !c.want:
			m = '.'
		case c.got:
			m = 'X'
		default:
			m = '!'
		}
		marks[k][c.probe] = m
	}
	var b strings.Builder
	var ports []string
	for _, p := range truthProbes {
		ports = append(ports, p.String())
	}
	fmt.Fprintf(&b, "cells: probes %s; + connected, . no answer (as the model says); X connected, denied by the model; ! no answer, allowed by the model\n",
		strings.Join(ports, " "))
	for fam, name := range truthFamilies {
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "%s from \\ to", name)
		for _, e := range ends {
			fmt.Fprintf(tw, "\t%s", e.name)
		}
		fmt.Fprintln(tw)
		for i, from := range ends {
			fmt.Fprint(tw, from.name)
			for j := range ends {
				m := marks[[3]int{fam, i, j}]
				if m == nil {
					m = []byte(strings.Repeat("-", len(truthProbes)))
				}
				fmt.Fprintf(tw, "\t%s", m)
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}
	return b.String()
}

// serveTruth listens on every probe port of end's addresses until t ends,
// answering each TCP connection and UDP datagram with end's name.
func serveTruth(t *testing.T, end truthEnd) {
	t.Helper()
	var wg sync.WaitGroup
	var closers []func() error
	t.Cleanup(func() {
		for _, c := range closers {
			c()
		}
		wg.Wait()
	})
	answer := []byte(end.name + "\n")
	for _, a := range end.addrs {
		for _, pr := range truthProbes {
			if pr.proto == truthICMP {
				continue // the stacks answer
			}
			var ln net.Listener
			var pc net.PacketConn
			var err error
			switch {
			case end.pod != nil && end.pod.sandbox:
				fa := tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(a), Port: pr.port}
				if pr.proto == corev1.ProtocolTCP {
					ln, err = gonet.ListenTCP(end.pod.sb.s, fa, tcpipx.ProtocolOf(a))
				} else {
					pc, err = gonet.DialUDP(end.pod.sb.s, &fa, nil, tcpipx.ProtocolOf(a))
				}
			default:
				n := end.host
				if end.pod != nil {
					n = end.pod.tap.ns
				}
				err = n.Do(func(ns.NetNS) error {
					var err error
					if pr.proto == corev1.ProtocolTCP {
						ln, err = net.Listen("tcp", netip.AddrPortFrom(a, pr.port).String())
					} else {
						pc, err = net.ListenPacket("udp", netip.AddrPortFrom(a, pr.port).String())
					}
					return err
				})
			}
			if err != nil {
				t.Fatalf("%s: listen on %s %s: %v", end.name, a, pr, err)
			}
			wg.Add(1)
			if ln != nil {
				closers = append(closers, ln.Close)
				go func() {
					defer wg.Done()
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						c.SetDeadline(time.Now().Add(ioTimeout))
						c.Write(answer)
						c.Close()
					}
				}()
				continue
			}
			closers = append(closers, pc.Close)
			go func() {
				defer wg.Done()
				buf := make([]byte, 64)
				for {
					_, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(answer, from)
				}
			}()
		}
	}
}

// probe connects from e to dst's address of family fam on pr. It reports
// true when dst answered, false when nothing answered within wait, and an
// error for anything else (refused, reset, another end answering).
func (e truthEnd) probe(dst truthEnd, fam int, pr truthProbe, wait time.Duration) (bool, error) {
	if pr.proto == truthICMP {
		return e.ping(dst.addrs[fam], wait)
	}
	to := netip.AddrPortFrom(dst.addrs[fam], pr.port)
	var c net.Conn
	var err error
	if e.pod != nil && e.pod.sandbox {
		s := e.pod.sb.s
		fa := tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(to.Addr()), Port: to.Port()}
		if pr.proto == corev1.ProtocolTCP {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			c, err = gonet.DialContextTCP(ctx, s, fa, tcpipx.ProtocolOf(to.Addr()))
			cancel()
			if err != nil && ctx.Err() != nil {
				return false, nil
			}
		} else {
			c, err = gonet.DialUDP(s, nil, &fa, tcpipx.ProtocolOf(to.Addr()))
		}
	} else {
		n := e.host
		if e.pod != nil {
			n = e.pod.tap.ns
		}
		err = n.Do(func(ns.NetNS) error {
			var err error
			c, err = (&net.Dialer{Timeout: wait}).Dial(strings.ToLower(string(pr.proto)), to.String())
			return err
		})
		var ne net.Error
		if err != nil && errors.As(err, &ne) && ne.Timeout() {
			return false, nil
		}
	}
	if err != nil {
		return false, err
	}
	defer c.Close()
	var line string
	if pr.proto == corev1.ProtocolUDP {
		// A datagram or its answer may be lost on a busy machine: sent
		// again every truthNoAnswer while the wait lasts.
		deadline := time.Now().Add(wait)
		buf := make([]byte, 256)
		for {
			if _, err := c.Write([]byte("probe\n")); err != nil {
				return false, err
			}
			c.SetReadDeadline(earlier(deadline, time.Now().Add(truthNoAnswer)))
			k, err := c.Read(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if time.Now().Before(deadline) {
					continue
				}
				return false, nil
			}
			if err != nil {
				return false, err
			}
			line = string(buf[:k])
			break
		}
	} else {
		// Connected: the answer follows at once; the deadline only
		// guards against a hang.
		c.SetDeadline(time.Now().Add(ioTimeout))
		if line, err = bufio.NewReader(c).ReadString('\n'); err != nil {
			return false, err
		}
	}
	if got := strings.TrimSuffix(line, "\n"); got != dst.name {
		return false, fmt.Errorf("answered by %q", got)
	}
	return true, nil
}

// Directions, for the model.
const (
	policyIngress = iota
	policyEgress
)

// truthModel is NetworkPolicy (networking.k8s.io/v1) as its API reference
// reads, judged flow by flow and written for this test alone (it shares
// nothing with package policy but Kubernetes' label selectors): a flow
// from one end to another passes when the source pod's egress and the
// destination pod's ingress both let it. A pod no policy selects in a
// direction is open in it; a selected pod takes what any rule of any
// selecting policy allows. The node's traffic to a pod is always allowed
// in; a pod's to the node is egress like any other. The node and a host
// outside are addresses no pod has: only ipBlocks and empty peer lists
// match them, and they have no named port.
type truthModel struct {
	policies []*networkingv1.NetworkPolicy
	// nsLabels are the namespaces' labels.
	nsLabels map[string]map[string]string
}

// applies reports whether pol restricts direction dir: its policyTypes,
// or ingress always and egress when it has egress rules.
func applies(pol *networkingv1.NetworkPolicy, dir int) bool {
	if len(pol.Spec.PolicyTypes) == 0 {
		return dir == policyIngress || len(pol.Spec.Egress) > 0
	}
	want := networkingv1.PolicyTypeIngress
	if dir == policyEgress {
		want = networkingv1.PolicyTypeEgress
	}
	return slices.Contains(pol.Spec.PolicyTypes, want)
}

func selectorMatches(sel *metav1.LabelSelector, l map[string]string) bool {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		panic(err) // the sets' selectors are valid
	}
	return s.Matches(labels.Set(l))
}

// selecting returns the policies selecting p in dir, as namespace/name,
// sorted.
func (m truthModel) selecting(p *truthPod, dir int) []string {
	var out []string
	for _, pol := range m.policies {
		if pol.Namespace == p.ns && applies(pol, dir) && selectorMatches(&pol.Spec.PodSelector, p.labels) {
			out = append(out, pol.Namespace+"/"+pol.Name)
		}
	}
	sort.Strings(out)
	return out
}

// allows reports whether the model lets from reach to on pr in family fam.
func (m truthModel) allows(from, to truthEnd, fam int, pr truthProbe) bool {
	if from.pod != nil && !m.lets(from.pod, policyEgress, to, to.pod, fam, pr) {
		return false
	}
	if to.pod != nil && !from.node && !m.lets(to.pod, policyIngress, from, to.pod, fam, pr) {
		return false
	}
	return true
}

// lets reports whether the policies selecting p in dir (if any) let a
// flow with peer on pr, whose destination pod dst (nil: not a pod) names
// its ports.
func (m truthModel) lets(p *truthPod, dir int, peer truthEnd, dst *truthPod, fam int, pr truthProbe) bool {
	selected := false
	for _, pol := range m.policies {
		if pol.Namespace != p.ns || !applies(pol, dir) || !selectorMatches(&pol.Spec.PodSelector, p.labels) {
			continue
		}
		selected = true
		if dir == policyIngress {
			for _, r := range pol.Spec.Ingress {
				if m.peersMatch(pol.Namespace, r.From, peer, fam) && portsMatch(r.Ports, dst, pr) {
					return true
				}
			}
		} else {
			for _, r := range pol.Spec.Egress {
				if m.peersMatch(pol.Namespace, r.To, peer, fam) && portsMatch(r.Ports, dst, pr) {
					return true
				}
			}
		}
	}
	return !selected
}

// peersMatch reports whether a rule's peers (of a policy in namespace
// polNS) take peer's address of family fam.
func (m truthModel) peersMatch(polNS string, peers []networkingv1.NetworkPolicyPeer, peer truthEnd, fam int) bool {
	if len(peers) == 0 {
		return true
	}
	a := peer.addrs[fam]
	for _, pr := range peers {
		if pr.IPBlock != nil {
			in := netip.MustParsePrefix(pr.IPBlock.CIDR).Contains(a)
			for _, e := range pr.IPBlock.Except {
				if netip.MustParsePrefix(e).Contains(a) {
					in = false
				}
			}
			if in {
				return true
			}
			continue
		}
		if peer.pod == nil {
			continue
		}
		nsOK := peer.pod.ns == polNS
		if pr.NamespaceSelector != nil {
			nl := map[string]string{"kubernetes.io/metadata.name": peer.pod.ns}
			for k, v := range m.nsLabels[peer.pod.ns] {
				nl[k] = v
			}
			nsOK = selectorMatches(pr.NamespaceSelector, nl)
		}
		if nsOK && (pr.PodSelector == nil || selectorMatches(pr.PodSelector, peer.pod.labels)) {
			return true
		}
	}
	return false
}

// portsMatch reports whether a rule's ports take pr to the pod dst (nil:
// an address no pod has, which has no named port).
func portsMatch(ports []networkingv1.NetworkPolicyPort, dst *truthPod, pr truthProbe) bool {
	if len(ports) == 0 {
		return true // every protocol, ICMP too
	}
	for _, p := range ports {
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		if proto != pr.proto {
			continue
		}
		switch {
		case p.Port == nil:
			return true
		case p.Port.Type == intstr.String:
			if dst == nil {
				continue
			}
			for _, cp := range dst.ports {
				cproto := cp.Protocol
				if cproto == "" {
					cproto = corev1.ProtocolTCP
				}
				if cp.Name == p.Port.StrVal && cproto == pr.proto && cp.ContainerPort == int32(pr.port) {
					return true
				}
			}
		default:
			end := p.Port.IntVal
			if p.EndPort != nil {
				end = *p.EndPort
			}
			if int32(pr.port) >= p.Port.IntVal && int32(pr.port) <= end {
				return true
			}
		}
	}
	return false
}

// The outside host's addresses and the node's on the link to it. Beyond
// the cluster CIDRs: the agent masquerades pod egress to them.
var (
	truthOutside4  = netip.MustParsePrefix("198.51.100.2/24")
	truthOutside6  = netip.MustParsePrefix("2001:db8:ff::2/64")
	truthOutsideGW = []netip.Prefix{netip.MustParsePrefix("198.51.100.1/24"), netip.MustParsePrefix("2001:db8:ff::1/64")}
)

// truthOutside returns a fresh namespace for a host beyond the node,
// joined to host by a veth pair, routing the node's pod CIDRs through
// it; host forwards.
func truthOutside(t *testing.T, host ns.NetNS) ns.NetNS {
	t.Helper()
	out := testutil.NewNS(t)
	up := func(name string, addrs ...netip.Prefix) error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			na := &netlink.Addr{IPNet: &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())}}
			if a.Addr().Is6() {
				na.Flags = unix.IFA_F_NODAD
			}
			if err := netlink.AddrAdd(l, na); err != nil {
				return fmt.Errorf("add %s to %s: %w", a, name, err)
			}
		}
		return netlink.LinkSetUp(l)
	}
	testutil.Do(t, host, func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "truth-out"}, PeerName: "truth-peer"}); err != nil {
			return err
		}
		peer, err := netlink.LinkByName("truth-peer")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(peer, int(out.Fd())); err != nil {
			return err
		}
		return up("truth-out", truthOutsideGW...)
	})
	testutil.Do(t, out, func() error {
		if err := up("truth-peer", truthOutside4, truthOutside6); err != nil {
			return err
		}
		for i, dst := range []netip.Prefix{podCIDR4, podCIDR6} {
			gw := truthOutsideGW[i].Addr()
			route := &netlink.Route{Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())}, Gw: gw.AsSlice()}
			if err := netlink.RouteAdd(route); err != nil {
				return fmt.Errorf("route %s via %s: %w", dst, gw, err)
			}
		}
		return nil
	})
	return out
}

// truthPingID numbers the echo requests of kernel-stack pings, whose raw
// sockets see every echo reply of their namespace.
var truthPingID atomic.Uint32

// ping sends an ICMP echo request from e to dst and reports whether the
// reply came within wait.
func (e truthEnd) ping(dst netip.Addr, wait time.Duration) (bool, error) {
	reqType, replyType := icmp.Type(ipv4.ICMPTypeEcho), icmp.Type(ipv4.ICMPTypeEchoReply)
	if dst.Is6() {
		reqType, replyType = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	id := int(truthPingID.Add(1) & 0xffff)
	req, err := (&icmp.Message{Type: reqType, Body: &icmp.Echo{ID: id, Seq: 1, Data: []byte("truth")}}).Marshal(nil)
	if err != nil {
		return false, err
	}
	if e.pod != nil && e.pod.sandbox {
		return sandboxPing(e.pod.sb.s, dst, req, wait)
	}
	n := e.host
	if e.pod != nil {
		n = e.pod.tap.ns
	}
	network, proto := "ip4:icmp", 1 // IANA protocol 1: ICMP
	if dst.Is6() {
		network, proto = "ip6:ipv6-icmp", 58 // IANA protocol 58: ICMPv6
	}
	var c *icmp.PacketConn
	if err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = icmp.ListenPacket(network, "")
		return err
	}); err != nil {
		return false, err
	}
	defer c.Close()
	// Sent again every truthNoAnswer while the wait lasts.
	deadline := time.Now().Add(wait)
	resend := time.Now()
	buf := make([]byte, 1500)
	for {
		if !time.Now().Before(resend) {
			if _, err := c.WriteTo(req, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
				return false, err
			}
			resend = time.Now().Add(truthNoAnswer)
			c.SetReadDeadline(earlier(deadline, resend))
		}
		k, from, err := c.ReadFrom(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if time.Now().Before(deadline) {
				continue
			}
			return false, nil
		}
		if err != nil {
			return false, err
		}
		m, err := icmp.ParseMessage(proto, buf[:k])
		if err != nil || m.Type != replyType {
			continue
		}
		if echo, ok := m.Body.(*icmp.Echo); ok && echo.ID == id {
			if got, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP); got.Unmap() != dst {
				return false, fmt.Errorf("echo reply from %s", got)
			}
			return true, nil
		}
	}
}

// sandboxPing sends the echo request req from the sandbox's netstack s to
// dst on a ping endpoint (which sets the identifier and takes only its
// own replies) and reports whether a reply came within wait.
func sandboxPing(s *stack.Stack, dst netip.Addr, req []byte, wait time.Duration) (bool, error) {
	tp, np, reply := gicmp.ProtocolNumber4, gipv4.ProtocolNumber, byte(ipv4.ICMPTypeEchoReply)
	if dst.Is6() {
		tp, np, reply = gicmp.ProtocolNumber6, gipv6.ProtocolNumber, byte(ipv6.ICMPTypeEchoReply)
	}
	var wq waiter.Queue
	we, ready := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	ep, terr := s.NewEndpoint(tp, np, &wq)
	if terr != nil {
		return false, fmt.Errorf("ping endpoint: %s", terr)
	}
	defer ep.Close()
	if terr := ep.Connect(tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(dst)}); terr != nil {
		return false, fmt.Errorf("ping connect %s: %s", dst, terr)
	}
	send := func() error {
		if _, terr := ep.Write(bytes.NewReader(req), tcpip.WriteOptions{}); terr != nil {
			return fmt.Errorf("ping %s: %s", dst, terr)
		}
		return nil
	}
	if err := send(); err != nil {
		return false, err
	}
	// Sent again every truthNoAnswer while the wait lasts.
	resend := time.NewTicker(truthNoAnswer)
	defer resend.Stop()
	guard := time.After(wait)
	for {
		var b bytes.Buffer
		_, terr := ep.Read(&b, tcpip.ReadOptions{})
		if _, ok := terr.(*tcpip.ErrWouldBlock); ok {
			select {
			case <-ready:
			case <-resend.C:
				if err := send(); err != nil {
					return false, err
				}
			case <-guard:
				return false, nil
			}
			continue
		}
		if terr != nil {
			return false, fmt.Errorf("ping %s: read: %s", dst, terr)
		}
		if b.Len() > 0 && b.Bytes()[0] == reply {
			return true, nil
		}
	}
}

// earlier returns the earlier of a and b.
func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
