package agent

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// TestKubeNetworkPolicyServices: NetworkPolicy sees through a ClusterIP
// whose endpoint is a pod of the node. The host's netfilter plays
// kube-proxy (nftables rules of the same shape as its: DNAT from the
// Service address to pod b, and the mark and masquerade for b reaching
// itself). Pod a's connection reaches b from a's own address (the router
// sends b's replies back through the host), so b's ingress policy judges a:
// denied under default deny, allowed once a policy lets a's label in. Pod
// b's connection to itself through the Service, masqueraded to the node by
// the host, passes under both (a pod cannot block access to itself), as
// does a connection from the host itself (a kubelet probe).
//
// As in TestKubeNetworkPolicy the API server is client-go's fake
// clientset; the agent, its router, the host's netfilter and the pods'
// kernel stacks are real.
func TestKubeNetworkPolicyServices(t *testing.T) {
	e := newEnv(t)
	client := twoPodCluster()
	cfg := e.config()
	cfg.NodeName = "self"
	cfg.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}
	// The host forwards a's connection back to b: in the test's host
	// namespace, whatever the machine's own setting (which a new
	// namespace inherits for IPv4).
	cfg.IPForward = true
	r := e.startWith(t, cfg, WithKubeClient(client))
	a := r.newTapPod(t, "pod-a", true)
	b := r.newTapPod(t, "pod-b", true)
	ln := listenIn(t, b.ns, b.addr(true))
	seen := make(chan netip.Addr, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case seen <- netip.MustParseAddrPort(c.RemoteAddr().String()).Addr().Unmap():
			default:
			}
			c.Close()
		}
	}()
	backend := netip.MustParseAddrPort(ln.Addr().String())
	vip := netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), 80)
	rules := fmt.Sprintf(`table ip svc {
	chain pre {
		type nat hook prerouting priority dstnat;
		ip daddr %[1]s tcp dport %[2]d ip saddr %[3]s meta mark set meta mark | 0x4000
		ip daddr %[1]s tcp dport %[2]d dnat to %[3]s:%[4]d
	}
	chain post {
		type nat hook postrouting priority srcnat;
		meta mark & 0x4000 == 0x4000 masquerade
	}
}
`, vip.Addr(), vip.Port(), backend.Addr(), backend.Port())
	testutil.Do(t, e.host, func() error {
		cmd := exec.Command("nft", "-f", "-")
		cmd.Stdin = bytes.NewBufferString(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nft: %v: %s", err, out)
		}
		return nil
	})
	// dial connects from n to dst and reports the source address b saw;
	// a connection the test wants refused gets deniedDial, the others
	// ioTimeout (a loaded machine may lose a first SYN).
	dial := func(n ns.NetNS, dst netip.AddrPort, passes bool) (netip.Addr, error) {
		wait := ioTimeout
		if !passes {
			wait = deniedDial
		}
		var c net.Conn
		err := n.Do(func(ns.NetNS) error {
			var err error
			c, err = (&net.Dialer{Timeout: wait}).Dial("tcp", dst.String())
			return err
		})
		if err != nil {
			return netip.Addr{}, err
		}
		c.Close()
		return <-seen, nil
	}
	gw, _ := router.NodeGateway(podCIDR4)
	base := "http://" + r.MetricsAddr().String()
	waitIngressPolicies(t, base, "default", "pod-pod-b")
	for _, c := range []struct {
		name string
		from ns.NetNS
		want netip.Addr
	}{{"a", a.ns, a.addr(true)}, {"b itself", b.ns, gw}} {
		got, err := dial(c.from, vip, true)
		if err != nil {
			t.Fatalf("%s -> Service without policy: %v", c.name, err)
		}
		if got != c.want {
			t.Errorf("%s -> Service: b saw %s, want %s", c.name, got, c.want)
		}
	}

	pols := client.NetworkingV1().NetworkPolicies("default")
	ctx := context.Background()
	create := func(name string, from ...networkingv1.NetworkPolicyPeer) {
		t.Helper()
		pol := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			},
		}
		if len(from) > 0 {
			pol.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: from}}
		}
		if _, err := pols.Create(ctx, pol, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(when string, aPasses bool) {
		t.Helper()
		if _, err := dial(a.ns, vip, aPasses); (err == nil) != aPasses {
			t.Errorf("%s: a -> Service -> b: %v, want passing %v", when, err, aPasses)
		}
		if _, err := dial(b.ns, vip, true); err != nil {
			t.Errorf("%s: b -> Service -> b itself: %v", when, err)
		}
		if _, err := dial(e.host, backend, true); err != nil {
			t.Errorf("%s: host -> b (a kubelet probe): %v", when, err)
		}
	}
	create("deny-b")
	waitIngressPolicies(t, base, "default", "pod-pod-b", "default/deny-b")
	check("default deny", false)
	create("allow-a", networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}}})
	waitIngressPolicies(t, base, "default", "pod-pod-b", "default/allow-a", "default/deny-b")
	check("a allowed", true)
	if v := metricValue(t, base, "shm_cni_hairpin_packets_total", nil); v < 1 {
		t.Errorf("shm_cni_hairpin_packets_total %v, want at least 1 (b's answers to a, back through the host)", v)
	}
}
