package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The policy case: what NetworkPolicy costs the fast path. One shm-cni
// node whose agent (the real process) reads a cluster from the bench's
// list/watch server (apiserver.go): its pods, 200 pods of other nodes in
// 10 namespaces, and 0, 100 or 1000 NetworkPolicies (-policies), which
// the agent's informers see change and its compiler compiles, as in a
// cluster. For each count, rep by rep, a pair of kernel pods on TAP links,
// one on veth links and a sandbox pair move a TCP stream and make 64 B
// round trips, and the kernel pairs open connections (the first packet of
// each is what policy judges afresh: on veth links the host queues it to
// the agent); ratios are to the same pairs with no policy (0), in the same
// run.

const (
	// benchNode is the node's name in the served cluster.
	benchNode = "bench-node"
	// policyNamespaces is how many namespaces the cluster has beside
	// the node's pods' (node.PodNamespace).
	policyNamespaces = 10
	// remotePods are the pods of other nodes: peers.
	remotePods = 200
	// selectEvery: policy i selects the measured pods when i is a
	// multiple of it (100 of 1000), besides the one that lets them talk.
	selectEvery = 10
)

// connectP50 is the measure of a new connection's opening: from the
// client's connect to its return (SYN, SYN-ACK), p50. Policy judges each
// connection's first packet afresh, which the fast path's measures do not
// show.
const connectP50 = "connect p50 µs"

// maxConnects bounds the connections a connect measure opens.
const maxConnects = 500

// policyRow is one pair's measure at one policy count.
type policyRow struct {
	Case     string    `json:"case"`
	Measure  string    `json:"measure"` // "Gbit/s", "p50 µs", "p99 µs", connectP50
	Policies int       `json:"policies"`
	Values   []float64 `json:"values"`
	Median   float64   `json:"median"`
	// Ratio is the median over the same case's with 0 policies: above 1
	// is faster for Gbit/s, slower for latency.
	Ratio float64 `json:"ratioToNoPolicy"`
	// AgentCPUPerGiB is the agent's CPU seconds per GiB (throughput).
	AgentCPUPerGiB       []float64 `json:"agentCPUSecondsPerGiB,omitempty"`
	MedianAgentCPUPerGiB float64   `json:"medianAgentCPUSecondsPerGiB,omitempty"`
	// AgentCPURatio is MedianAgentCPUPerGiB over the same case's with
	// 0 policies: what policy costs the agent, from its own CPU time
	// (exact whatever else the machine runs).
	AgentCPURatio float64 `json:"agentCPURatioToNoPolicy,omitempty"`
	Error         string  `json:"error,omitempty"`
}

// policyObjects is the served cluster for n policies: namespaces, the
// Node, pods (local: the measured ones, role=bench and app=<name>) and
// policies. They are built once and reused, so that going from one count
// to another changes only the policies that differ.
type policyObjects struct {
	namespaces, nodes, pods []apiObject
	policies                []*networkingv1.NetworkPolicy
	// selecting counts, by direction (ingress, egress), the policies
	// among the first i that select a measured pod: selecting[i].
	selecting [][2]int
}

// newPolicyObjects builds the cluster for up to max policies; local are
// the measured pods' names, gateway the node's address.
func newPolicyObjects(local []string, gateway netip.Addr, max int) *policyObjects {
	o := &policyObjects{}
	tm := func(kind string) metav1.TypeMeta { return metav1.TypeMeta{Kind: kind, APIVersion: "v1"} }
	nsName := func(i int) string {
		if i == 0 {
			return node.PodNamespace
		}
		return "team-" + strconv.Itoa(i)
	}
	for i := 0; i < policyNamespaces; i++ {
		o.namespaces = append(o.namespaces, &corev1.Namespace{TypeMeta: tm("Namespace"), ObjectMeta: metav1.ObjectMeta{
			Name: nsName(i), Labels: map[string]string{"team": "t" + strconv.Itoa(i%5), "env": []string{"prod", "dev"}[i%2]}}})
	}
	o.nodes = []apiObject{&corev1.Node{TypeMeta: tm("Node"), ObjectMeta: metav1.ObjectMeta{Name: benchNode},
		Spec:   corev1.NodeSpec{PodCIDR: node.PodCIDR4.String(), PodCIDRs: []string{node.PodCIDR4.String(), node.PodCIDR6.String()}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: gateway.String()}}}}}
	for _, name := range local {
		o.pods = append(o.pods, &corev1.Pod{TypeMeta: tm("Pod"),
			ObjectMeta: metav1.ObjectMeta{Namespace: node.PodNamespace, Name: name, Labels: map[string]string{"role": "bench", "app": name}},
			Spec: corev1.PodSpec{NodeName: benchNode, Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}}}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning}})
	}
	for i := 0; i < remotePods; i++ {
		a := netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(1 + i%250)})
		o.pods = append(o.pods, &corev1.Pod{TypeMeta: tm("Pod"),
			ObjectMeta: metav1.ObjectMeta{Namespace: nsName(i % policyNamespaces), Name: "remote-" + strconv.Itoa(i),
				Labels: map[string]string{"app": "svc" + strconv.Itoa(i%50), "tier": []string{"web", "api", "db"}[i%3]}},
			Spec: corev1.PodSpec{NodeName: "other-node", Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}}}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: a.String(), PodIPs: []corev1.PodIP{{IP: a.String()}}}})
	}
	// The measured pods may talk to each other, both ways, on every
	// port: the policy every count above 0 has first.
	bench := metav1.LabelSelector{MatchLabels: map[string]string{"role": "bench"}}
	o.policies = append(o.policies, &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{Kind: "NetworkPolicy", APIVersion: "networking.k8s.io/v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: node.PodNamespace, Name: "bench-allow"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: bench,
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &bench}}}},
			Egress:      []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{PodSelector: &bench}}}}}})
	for i := 1; i < max; i++ {
		o.policies = append(o.policies, scalePolicy(i, local, nsName))
	}
	o.selecting = make([][2]int, len(o.policies)+1)
	for i, p := range o.policies {
		o.selecting[i+1] = o.selecting[i]
		if p.Namespace != node.PodNamespace || (p.Name != "bench-allow" && i%selectEvery != 0) {
			continue
		}
		for _, t := range p.Spec.PolicyTypes {
			if t == networkingv1.PolicyTypeIngress {
				o.selecting[i+1][0]++
			} else {
				o.selecting[i+1][1]++
			}
		}
	}
	return o
}

// scalePolicy is policy i of the cluster, of the kinds clusters have:
// every selectEvery-th selects the measured pods (in their namespace),
// the others pods of other namespaces or apps; ingress from pods of
// labelled namespaces, from pods of the namespace, from ipBlocks with
// exceptions; ports by number, range and name; a third also restrict
// egress (DNS, HTTPS to the world but the metadata address, a CIDR).
func scalePolicy(i int, local []string, nsName func(int) string) *networkingv1.NetworkPolicy {
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	port := func(proto *corev1.Protocol, p intstr.IntOrString, end int32) networkingv1.NetworkPolicyPort {
		np := networkingv1.NetworkPolicyPort{Protocol: proto, Port: &p}
		if end > 0 {
			np.EndPort = &end
		}
		return np
	}
	ns := nsName(i % policyNamespaces)
	sel := metav1.LabelSelector{MatchLabels: map[string]string{"app": "svc" + strconv.Itoa(i%50)}}
	if i%selectEvery == 0 {
		ns = node.PodNamespace
		sel = metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
			{Key: "app", Operator: metav1.LabelSelectorOpIn, Values: local}}}
	}
	var from []networkingv1.NetworkPolicyPeer
	switch i % 3 {
	case 0:
		from = []networkingv1.NetworkPolicyPeer{{
			PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"tier": []string{"web", "api", "db"}[i%3]}},
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "t" + strconv.Itoa(i%5)}}}}
	case 1:
		from = []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "svc" + strconv.Itoa((i+1)%50)}}}}
	case 2:
		from = []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{
			CIDR:   fmt.Sprintf("172.%d.0.0/16", 16+i%16),
			Except: []string{fmt.Sprintf("172.%d.%d.0/24", 16+i%16, i%250)}}}}
	}
	ports := []networkingv1.NetworkPolicyPort{port(&tcp, intstr.FromInt32(int32(1000+i%60000)), 0)}
	switch i % 4 {
	case 1:
		ports = append(ports, port(&tcp, intstr.FromInt32(int32(20000+i%1000)), int32(20010+i%1000)))
	case 2:
		ports = append(ports, port(&tcp, intstr.FromString("http"), 0))
	case 3:
		ports = append(ports, port(&udp, intstr.FromInt32(int32(5000+i%1000)), 0))
	}
	p := &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{Kind: "NetworkPolicy", APIVersion: "networking.k8s.io/v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "np-" + strconv.Itoa(i)},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: sel,
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: from, Ports: ports}}},
	}
	if i%3 == 0 {
		dns := intstr.FromInt32(53)
		https := intstr.FromInt32(443)
		p.Spec.PolicyTypes = append(p.Spec.PolicyTypes, networkingv1.PolicyTypeEgress)
		p.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{
			{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &dns}, {Protocol: &tcp, Port: &dns}}},
			{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "0.0.0.0/0", Except: []string{"169.254.169.254/32"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &https}}},
			{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: fmt.Sprintf("10.%d.0.0/16", 100+i%100)}}}},
		}
	}
	return p
}

// set serves the cluster with the first n policies (0: none).
func (o *policyObjects) set(s *listWatchServer, n int) error {
	var pols []apiObject
	for _, p := range o.policies[:n] {
		pols = append(pols, p)
	}
	for _, r := range []struct {
		path string
		objs []apiObject
	}{
		{"api/v1/namespaces", o.namespaces}, {"api/v1/nodes", o.nodes}, {"api/v1/pods", o.pods},
		{"apis/networking.k8s.io/v1/networkpolicies", pols},
	} {
		if err := s.set(r.path, r.objs); err != nil {
			return err
		}
	}
	return nil
}

// waitPolicies waits until the agent's /metrics shows the policies
// isolating its pods that the first n policies make: the snapshot of n
// policies is installed.
func waitPolicies(ctx context.Context, n *node.Node, want [2]int) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		fams, err := n.Metrics(ctx)
		var got [2]int
		if err == nil {
			for _, m := range fams["shm_cni_networkpolicy_denied_packets_total"].GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "direction" && l.GetValue() == "ingress" {
						got[0]++
					} else if l.GetName() == "direction" && l.GetValue() == "egress" {
						got[1]++
					}
				}
			}
			if _, ok := fams["shm_cni_policy_problems"]; ok && got == want {
				return nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("agent's snapshot: policies isolating its pods (ingress, egress) %v, want %v (err %v)", got, want, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// runPolicy measures the policy case.
func (b *bench) runPolicy(ctx context.Context, rep *report) error {
	log := b.log
	if len(b.cfg.policies) == 0 || b.cfg.policies[0] != 0 {
		return errors.New("-policies: the first count must be 0, the ratios' reference")
	}
	kubeconfig := filepath.Join(b.tmp, "kubeconfig")
	n, err := b.newNode(ctx, node.Options{MTU: b.cfg.mtu, ShmMTU: b.cfg.shmMTU, NoVerify: true, DeferAgent: true,
		ExtraAgentArgs: []string{"--node-name=" + benchNode, "--kubeconfig=" + kubeconfig}})
	if err != nil {
		return err
	}
	api, err := startListWatchServer(n.Host)
	if err != nil {
		return err
	}
	defer api.close()
	if err := api.writeKubeconfig(kubeconfig); err != nil {
		return err
	}
	local := []string{"pk1", "pk2", "pv1", "pv2", "ps0", "ps1", "pe0", "pc0"}
	maxN := 0
	for _, c := range b.cfg.policies {
		maxN = max(maxN, c)
	}
	objs := newPolicyObjects(local, n.Gateway4, maxN)
	if err := objs.set(api, 0); err != nil {
		return err
	}
	log.Info("policy case: starting the agent against the bench's list/watch server")
	if err := n.StartAgent(ctx); err != nil {
		return err
	}
	pods := map[string]*node.Pod{}
	for _, name := range local {
		kind := node.KindShm
		switch name[1] {
		case 'k':
			kind = node.KindTap
		case 'v':
			kind = node.KindVeth
		}
		if pods[name], err = n.AddPod(ctx, name, kind); err != nil {
			return err
		}
	}
	echo, err := n.StartSandbox(pods["pe0"], "--mode", "echo", "--port", strconv.Itoa(echoPort))
	if err != nil {
		return err
	}
	if _, err := echo.WaitLine(ctx, "ready"); err != nil {
		return err
	}
	k1 := kend{"pk1", pods["pk1"].NS, pods["pk1"].Addr4}
	k2 := kend{"pk2", pods["pk2"].NS, pods["pk2"].Addr4}
	v1 := kend{"pv1", pods["pv1"].NS, pods["pv1"].Addr4}
	v2 := kend{"pv2", pods["pv2"].NS, pods["pv2"].Addr4}
	for _, e := range []kend{k2, v2} {
		if err := b.iperfServer(ctx, e); err != nil {
			return err
		}
	}
	connects := min(b.cfg.rttCount, maxConnects)
	e0Addr := netip.AddrPortFrom(pods["pe0"].Addr4, echoPort)
	type pcase struct {
		name string
		tput func(ctx context.Context) (tputSample, error)
		rtt  func(ctx context.Context) ([]time.Duration, error)
		// conn times new connections; nil: not measured.
		conn func(ctx context.Context) ([]time.Duration, error)
	}
	cases := []pcase{
		{"tap pod → tap pod",
			func(ctx context.Context) (tputSample, error) { return b.iperfClient(ctx, k1, k2, 1) },
			func(ctx context.Context) ([]time.Duration, error) { return kernelRTT(ctx, k1, k2, b.cfg.rttCount) },
			func(ctx context.Context) ([]time.Duration, error) { return kernelConnects(ctx, k1, k2, connects) }},
		{"veth pod → veth pod",
			func(ctx context.Context) (tputSample, error) { return b.iperfClient(ctx, v1, v2, 1) },
			func(ctx context.Context) ([]time.Duration, error) { return kernelRTT(ctx, v1, v2, b.cfg.rttCount) },
			func(ctx context.Context) ([]time.Duration, error) { return kernelConnects(ctx, v1, v2, connects) }},
		{"sandbox → sandbox",
			func(ctx context.Context) (tputSample, error) {
				return transfers(ctx, n, []*node.Peer{n.PodPeer(pods["ps1"])}, n.PodPeer(pods["ps0"]), 1, b.cfg.amount())
			},
			func(ctx context.Context) ([]time.Duration, error) {
				return netstackRTT(ctx, n, pods["pc0"], e0Addr, b.cfg.rttCount)
			}, nil},
	}
	type key struct {
		c        int
		measure  string
		policies int
	}
	vals := map[key][]float64{}
	agentCPU := map[key][]float64{}
	errs := map[key]string{}
	for r := range b.cfg.reps {
		for _, count := range b.cfg.policies {
			if err := objs.set(api, count); err != nil {
				return err
			}
			if err := waitPolicies(ctx, n, objs.selecting[count]); err != nil {
				return err
			}
			for i, c := range cases {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				k := key{i, "Gbit/s", count}
				agent0, _ := n.CPU()
				v, err := c.tput(ctx)
				agent1, _ := n.CPU()
				if err != nil {
					log.Warn("policy throughput", "case", c.name, "policies", count, "rep", r+1, "err", err)
					errs[k] = err.Error()
				} else {
					vals[k] = append(vals[k], v.bitsPerSecond/1e9)
					if v.bytes > 0 {
						agentCPU[k] = append(agentCPU[k], (agent1-agent0).Seconds()/(v.bytes/(1<<30)))
					}
					log.Info("policy throughput", "case", c.name, "policies", count, "rep", r+1, "Gbit/s", fmt.Sprintf("%.2f", v.bitsPerSecond/1e9))
				}
				ds, err := c.rtt(ctx)
				if err != nil {
					log.Warn("policy latency", "case", c.name, "policies", count, "rep", r+1, "err", err)
					errs[key{i, "p50 µs", count}] = err.Error()
					continue
				}
				vals[key{i, "p50 µs", count}] = append(vals[key{i, "p50 µs", count}], percentile(ds, 50))
				vals[key{i, "p99 µs", count}] = append(vals[key{i, "p99 µs", count}], percentile(ds, 99))
				log.Info("policy latency", "case", c.name, "policies", count, "rep", r+1,
					"p50 µs", fmt.Sprintf("%.1f", percentile(ds, 50)), "p99 µs", fmt.Sprintf("%.1f", percentile(ds, 99)))
				if c.conn == nil {
					continue
				}
				if ds, err = c.conn(ctx); err != nil {
					log.Warn("policy connect", "case", c.name, "policies", count, "rep", r+1, "err", err)
					errs[key{i, connectP50, count}] = err.Error()
					continue
				}
				vals[key{i, connectP50, count}] = append(vals[key{i, connectP50, count}], percentile(ds, 50))
				log.Info("policy connect", "case", c.name, "policies", count, "rep", r+1, "p50 µs", fmt.Sprintf("%.1f", percentile(ds, 50)))
			}
		}
	}
	for i, c := range cases {
		for _, m := range []string{"Gbit/s", "p50 µs", "p99 µs", connectP50} {
			if m == connectP50 && c.conn == nil {
				continue
			}
			ref := median(vals[key{i, m, 0}])
			refCPU := median(agentCPU[key{i, m, 0}])
			for _, count := range b.cfg.policies {
				k := key{i, m, count}
				row := policyRow{Case: c.name, Measure: m, Policies: count, Values: vals[k], Median: median(vals[k]),
					AgentCPUPerGiB: agentCPU[k], MedianAgentCPUPerGiB: median(agentCPU[k]), Error: errs[k]}
				row.Ratio = ratio(row.Median, ref)
				row.AgentCPURatio = ratio(row.MedianAgentCPUPerGiB, refCPU)
				rep.Policy = append(rep.Policy, row)
			}
		}
	}
	return b.closeNode(n)
}

// kernelConnects opens count TCP connections from src's namespace to a
// listener in dst's, one after another, and returns the time each took to
// open (the client's connect: its SYN out, the SYN-ACK back).
func kernelConnects(ctx context.Context, src, dst kend, count int) ([]time.Duration, error) {
	addr, stop, err := serveIn(dst, func(net.Conn) {})
	if err != nil {
		return nil, err
	}
	defer stop()
	to := addr.String()
	out := make([]time.Duration, 0, count)
	err = src.ns.Do(func(ns.NetNS) error {
		d := net.Dialer{Timeout: 5 * time.Second}
		for i := range count {
			start := time.Now()
			c, err := d.DialContext(ctx, "tcp", to)
			if err != nil {
				return fmt.Errorf("connection %d from %s to %s: %w", i, src.name, to, err)
			}
			out = append(out, time.Since(start))
			c.Close()
		}
		return nil
	})
	return out, err
}
