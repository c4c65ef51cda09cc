package agent

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/kube"
)

// TestConfigValidateKube: the flags of the Kubernetes integration and the
// CNI install are checked with the rest, each error naming its flag.
func TestConfigValidateKube(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string // substrings of the error; none for valid
	}{
		{"node name instead of pod CIDRs", func(c *Config) { c.PodCIDRs = nil; c.NodeName = "n1" }, nil},
		{"neither", func(c *Config) { c.PodCIDRs = nil }, []string{"--pod-cidr: required (or --node-name"}},
		{"peer route", func(c *Config) { c.PeerRoutes = routes(t, "10.245.1.0/24=192.0.2.2") }, nil},
		{"peer route over own pod CIDR", func(c *Config) { c.PeerRoutes = routes(t, "10.244.0.0/16=192.0.2.2") }, []string{"--peer-routes", "overlaps this node's pod CIDR 10.244.1.0/24"}},
		{"relative sources", func(c *Config) { c.CNIBinarySource = "shm-cni"; c.CNIConfSource = "x.conflist" }, []string{"--cni-binary-source", "--cni-conf-source"}},
		{"relative dirs", func(c *Config) {
			c.CNIBinarySource, c.CNIConfSource = "/usr/local/bin/shm-cni", "/etc/shm-cni/10-shm-cni.conflist"
			c.CNIBinDir, c.CNIConfDir = "opt", "net.d"
		}, []string{"--cni-bin-dir", "--cni-conf-dir"}},
		{"relative dirs unused", func(c *Config) { c.CNIBinDir, c.CNIConfDir = "opt", "net.d" }, nil},
		{"conflist file name", func(c *Config) { c.CNIConfSource = "/etc/shm-cni/config.json" }, []string{"--cni-conf-source", "must end in .conflist"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := (&env{dir: "/tmp/x"}).config()
			tc.edit(&c)
			err := c.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Errorf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate accepted it, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate: %v; want it to contain %q", err, w)
				}
			}
		})
	}
}

func routes(t *testing.T, s ...string) kube.RouteList {
	t.Helper()
	var l kube.RouteList
	for _, r := range s {
		if err := l.Set(r); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// TestConnectKubeWithoutAPI: without a node name ConnectKube does nothing;
// with one but no API configuration it fails when the pod CIDRs are
// unknown and goes on without a client when they are given.
func TestConnectKubeWithoutAPI(t *testing.T) {
	// Not in a cluster: rest.InClusterConfig needs these.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	log := testutil.Logger(t)
	base := (&env{dir: "/tmp/x"}).config()

	c := base
	if kc, err := ConnectKube(context.Background(), &c, log); kc != nil || err != nil {
		t.Errorf("without a node name: %v, %v; want nil, nil", kc, err)
	}
	c = base
	c.NodeName, c.PodCIDRs = "n1", nil
	if _, err := ConnectKube(context.Background(), &c, log); err == nil || !strings.Contains(err.Error(), "--pod-cidr not given and no Kubernetes API") {
		t.Errorf("no pod CIDRs, no API: %v; want an error saying so", err)
	}
	c = base
	c.NodeName = "n1"
	if kc, err := ConnectKube(context.Background(), &c, log); kc != nil || err != nil {
		t.Errorf("pod CIDRs given, no API: %v, %v; want nil, nil", kc, err)
	}
	// An agent made without pod CIDRs at all says why.
	c = base
	c.NodeName, c.PodCIDRs = "n1", nil
	if _, err := New(c, log); err == nil || !strings.Contains(err.Error(), "--pod-cidr not given") {
		t.Errorf("New without pod CIDRs: %v", err)
	}
}

// peerLink adds a veth pair "peers0"/"peers1" up in the host namespace,
// peers0 with 192.0.2.1/24, so that 192.0.2.x gateways are on link.
func peerLink(t *testing.T, e *env) {
	t.Helper()
	testutil.Do(t, e.host, func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "peers0"}, PeerName: "peers1"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("peers0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(192, 0, 2, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		for _, n := range []string{"peers0", "peers1"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		return nil
	})
}

// ourRoutes returns the host's routes of kube.RouteProtocol as
// "dst=gateway".
func ourRoutes(t *testing.T, e *env) string {
	t.Helper()
	var out []string
	testutil.Do(t, e.host, func() error {
		rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: kube.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		for _, r := range rs {
			out = append(out, r.Dst.String()+"="+r.Gw.String())
		}
		return err
	})
	return strings.Join(out, ",")
}

// TestStaticPeerRoutes: an agent with --peer-routes routes them in the
// host netns, tagged with kube.RouteProtocol, before it serves, and removes
// a stale route of an earlier agent; the routes stay when it stops. A peer
// route the kernel refuses (a gateway not on any link) stops the agent.
func TestStaticPeerRoutes(t *testing.T) {
	e := newEnv(t)
	peerLink(t, e)
	testutil.Do(t, e.host, func() error {
		return netlink.RouteAdd(&netlink.Route{
			Dst: &net.IPNet{IP: net.IPv4(10, 246, 0, 0), Mask: net.CIDRMask(24, 32)}, Gw: net.IPv4(192, 0, 2, 9), Protocol: kube.RouteProtocol,
		})
	})
	cfg := e.config()
	cfg.PeerRoutes = routes(t, "10.245.1.0/24=192.0.2.2", "10.245.2.0/24=192.0.2.3")
	r := e.startWith(t, cfg)
	want := "10.245.1.0/24=192.0.2.2,10.245.2.0/24=192.0.2.3"
	if got := ourRoutes(t, e); got != want {
		t.Errorf("routes once ready %q, want %q", got, want)
	}
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	if got := ourRoutes(t, e); got != want {
		t.Errorf("routes after the agent stopped %q, want %q (kept)", got, want)
	}

	cfg.PeerRoutes = routes(t, "10.245.3.0/24=198.51.100.1")
	var a *Agent
	testutil.Do(t, e.host, func() error {
		var err error
		a, err = New(cfg, testutil.Logger(t))
		return err
	})
	// Should the agent accept the route after all, Run would serve until
	// the timeout, and the test fails instead of hanging.
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if err := a.Run(ctx); err == nil || !strings.Contains(err.Error(), "peer routes") {
		t.Errorf("Run with an unroutable peer: %v, want a peer routes error", err)
	}
}

// TestKubePeerRoutes: an agent given a Kubernetes client keeps the host's
// routes in step with the Node list: the other nodes' pod CIDRs via their
// InternalIPs, a new node's too.
//
// The API server is client-go's fake clientset: no API server runs here.
// The agent, its router, netlink and the kernel's routes are real.
func TestKubePeerRoutes(t *testing.T) {
	e := newEnv(t)
	peerLink(t, e)
	mk := func(name, cidr, ip string) *corev1.Node {
		return &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
			Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
		}
	}
	client := fake.NewClientset(mk("self", podCIDR4.String(), "192.0.2.1"), mk("n2", "10.244.2.0/24", "192.0.2.2"))
	cfg := e.config()
	cfg.NodeName = "self"
	e.startWith(t, cfg, WithKubeClient(client))

	waitRoutes := func(want string) {
		t.Helper()
		guard := time.After(callTimeout)
		for ourRoutes(t, e) != want {
			select {
			case <-guard:
				t.Fatalf("routes %q, want %q", ourRoutes(t, e), want)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitRoutes("10.244.2.0/24=192.0.2.2")
	if _, err := client.CoreV1().Nodes().Create(context.Background(), mk("n3", "10.244.3.0/24", "192.0.2.3"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitRoutes("10.244.2.0/24=192.0.2.2,10.244.3.0/24=192.0.2.3")
}
