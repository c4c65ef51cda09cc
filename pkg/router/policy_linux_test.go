package router

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/policy"
)

// deniedWait bounds the wait for a connection policy denies: its dial
// must not complete in this long. Not a measurement: an allowed dial
// through the router completes in well under a millisecond.
const deniedWait = 2 * time.Second

// policyInput is newEnv's two pods as Kubernetes sees them (default/a,
// app=a; default/b, app=b) under pols.
func policyInput(pols ...*networkingv1.NetworkPolicy) policy.Input {
	return policy.Input{Pods: []*corev1.Pod{policyPod("a", podA4, podA6), policyPod("b", podB4, podB6)}, Policies: pols}
}

// policyPod is the pod default/name, app=name, with addrs.
func policyPod(name string, addrs ...netip.Addr) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Labels: map[string]string{"app": name}}}
	for _, a := range addrs {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: a.String()})
	}
	return p
}

// denyIngress isolates every pod of the namespace for ingress.
var denyIngress = &networkingv1.NetworkPolicy{
	ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "deny"},
	Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
}

// bFromA lets pod a reach pod b on the TCP ports.
func bFromA(ports ...int32) *networkingv1.NetworkPolicy { return allowFrom("b", "a", ports...) }

// allowFrom lets the pods app=from reach the pods app=to on the TCP ports.
func allowFrom(to, from string, ports ...int32) *networkingv1.NetworkPolicy {
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: to + "-from-" + from},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": to}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": from}}}},
			}},
		},
	}
	for _, p := range ports {
		port := intstr.FromInt32(p)
		np.Spec.Ingress[0].Ports = append(np.Spec.Ingress[0].Ports, networkingv1.NetworkPolicyPort{Port: &port})
	}
	return np
}

// echoServer listens on addr:port inside n and echoes every line back,
// until t ends.
func echoServer(t testing.TB, n ns.NetNS, addr netip.Addr, port uint16) {
	t.Helper()
	var ln net.Listener
	testutil.Do(t, n, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, port).String())
		return err
	})
	t.Cleanup(func() { ln.Close() })
	serveEcho(ln)
}

// serveEcho echoes every line of every connection to ln back, until ln is
// closed.
func serveEcho(ln net.Listener) {
	serveEach(ln, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			if _, err := c.Write(line); err != nil {
				return
			}
		}
	})
}

// dialFrom dials addr:port from inside n, giving up after wait.
func dialFrom(n ns.NetNS, addr netip.Addr, port uint16, wait time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = (&net.Dialer{Timeout: wait}).Dial("tcp", netip.AddrPortFrom(addr, port).String())
		return err
	})
	return c, err
}

// echoConn is a connection to an echoServer.
type echoConn struct {
	c net.Conn
	r *bufio.Reader
}

func newEchoConn(c net.Conn) *echoConn { return &echoConn{c: c, r: bufio.NewReader(c)} }

// roundTrip sends a line and reads it back, giving up after wait.
func (e *echoConn) roundTrip(i int, wait time.Duration) error {
	e.c.SetDeadline(time.Now().Add(wait))
	msg := fmt.Sprintf("round trip %d\n", i)
	if _, err := e.c.Write([]byte(msg)); err != nil {
		return err
	}
	got, err := e.r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// connects reports whether a TCP connection from n to addr:port opens and
// carries a round trip; false when the dial times out.
func connects(t *testing.T, n ns.NetNS, addr netip.Addr, port uint16) bool {
	t.Helper()
	return connectsWith(t, func(addr netip.Addr, port uint16, wait time.Duration) (net.Conn, error) {
		return dialFrom(n, addr, port, wait)
	}, addr, port)
}

// dialer dials addr:port from a pod, giving up after wait.
type dialer func(addr netip.Addr, port uint16, wait time.Duration) (net.Conn, error)

// connectsWith is connects from the pod of dial.
func connectsWith(t *testing.T, dial dialer, addr netip.Addr, port uint16) bool {
	t.Helper()
	c, err := dial(addr, port, deniedWait)
	if err != nil {
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("dial %s port %d: %v (want success or a timeout)", addr, port, err)
		}
		return false
	}
	defer c.Close()
	if err := newEchoConn(c).roundTrip(0, ioDeadline); err != nil {
		t.Fatalf("round trip to %s port %d: %v", addr, port, err)
	}
	return true
}

// TestPolicyEnforced proves with real TCP through the router, on the fast
// path and on gVisor's forwarding, in both families: with every pod
// isolated for ingress and b open to a on port 8080, a reaches b there and
// b's replies come back to a (which takes nothing in: they pass as
// replies); a cannot reach b on another port, b cannot reach a, the host
// outside the node cannot reach b, and the node (kubelet's probes) can.
// Removing the snapshot opens everything again.
func TestPolicyEnforced(t *testing.T) {
	for _, path := range []struct {
		name string
		slow bool
	}{{"fast path", false}, {"gVisor forwarding", true}} {
		t.Run(path.name, func(t *testing.T) {
			cfg := dualStackConfig(false)
			cfg.NoFastPath = path.slow
			e := newEnv(t, cfg)
			for _, f := range families {
				echoServer(t, e.b.ns, f.b, 8080)
				echoServer(t, e.b.ns, f.b, 8081)
				echoServer(t, e.a.ns, f.a, 8080)
			}
			e.r.SetPolicy(policy.Compile(policyInput(denyIngress, bFromA(8080)), nil))
			for _, f := range families {
				t.Run(f.name, func(t *testing.T) {
					for _, c := range []struct {
						what string
						from ns.NetNS
						to   netip.Addr
						port uint16
						want bool
					}{
						{"a to b, allowed port", e.a.ns, f.b, 8080, true},
						{"a to b, other port", e.a.ns, f.b, 8081, false},
						{"b to a", e.b.ns, f.a, 8080, false},
						{"outside to b", e.outside, f.b, 8080, false},
						{"node to b", e.host, f.b, 8081, true},
					} {
						if got := connects(t, c.from, c.to, c.port); got != c.want {
							t.Errorf("%s: connected %v, want %v", c.what, got, c.want)
						}
					}
				})
			}
			denied := map[string][2]uint64{}
			for _, pc := range e.r.PolicyCounts() {
				denied[pc.Pod] = pc.Denied
			}
			if denied["a"][policy.Ingress] == 0 || denied["b"][policy.Ingress] == 0 {
				t.Errorf("denied counters %v: want ingress denials for a and b", denied)
			}
			e.r.SetPolicy(nil)
			for _, f := range families {
				if !connects(t, e.a.ns, f.b, 8081) || !connects(t, e.b.ns, f.a, 8080) || !connects(t, e.outside, f.b, 8080) {
					t.Errorf("%s: connections still denied without policy", f.name)
				}
			}
		})
	}
}

// TestPolicyChangeUnderLoad proves that a new snapshot keeps a busy
// connection it still allows (round trips carry on across the change
// without an error) and stops one it now denies, in both families, from a
// kernel pod to a kernel pod, from a kernel pod to a sandbox and from a
// sandbox to a kernel pod (a shared-memory link, the router's server end).
func TestPolicyChangeUnderLoad(t *testing.T) {
	e := newEnv(t, dualStackConfig(false))
	sb := newSandboxPod(t, e.r, "pod-s", podS4, podS6)
	for _, f := range families {
		for _, port := range []uint16{8080, 9090} {
			echoServer(t, e.b.ns, f.b, port)
			serveEcho(sb.listen(t, sandboxAddr(f.a), port))
		}
	}
	fromA := func(addr netip.Addr, port uint16, wait time.Duration) (net.Conn, error) {
		return dialFrom(e.a.ns, addr, port, wait)
	}
	for _, c := range []struct {
		name         string
		client, serv string // the pods' app labels
		dial         dialer
		to           func(family netip.Addr) netip.Addr
	}{
		{"kernel to kernel", "a", "b", fromA, func(f netip.Addr) netip.Addr { return e.b.addr(f) }},
		{"kernel to sandbox", "a", "s", fromA, sandboxAddr},
		{"sandbox to kernel", "s", "b", sb.dial, func(f netip.Addr) netip.Addr { return e.b.addr(f) }},
	} {
		for _, f := range families {
			t.Run(c.name+"/"+f.name, func(t *testing.T) {
				in := func(ports ...int32) policy.Input {
					in := policyInput(denyIngress, allowFrom(c.serv, c.client, ports...))
					in.Pods = append(in.Pods, policyPod("s", podS4, podS6))
					return in
				}
				dst := c.to(f.a)
				e.r.SetPolicy(policy.Compile(in(8080, 9090), e.r.Policy()))
				var conns [2]*echoConn
				for i, port := range []uint16{8080, 9090} {
					conn, err := c.dial(dst, port, ioDeadline)
					if err != nil {
						t.Fatalf("dial port %d: %v", port, err)
					}
					t.Cleanup(func() { conn.Close() })
					conns[i] = newEchoConn(conn)
					if err := conns[i].roundTrip(0, ioDeadline); err != nil {
						t.Fatalf("port %d before the change: %v", port, err)
					}
				}
				kept, cut := conns[0], conns[1]

				// kept is busy across the change: round trips back to back.
				var trips atomic.Int64
				stop, done := make(chan struct{}), make(chan error, 1)
				go func() {
					for i := 1; ; i++ {
						select {
						case <-stop:
							done <- nil
							return
						default:
						}
						if err := kept.roundTrip(i, ioDeadline); err != nil {
							done <- fmt.Errorf("round trip %d: %w", i, err)
							return
						}
						trips.Add(1)
					}
				}()
				waitTrips := func(n int64) {
					for trips.Load() < n {
						select {
						case err := <-done:
							t.Fatalf("the allowed connection broke: %v", err)
						case <-time.After(time.Millisecond):
						}
					}
				}
				waitTrips(100)
				e.r.SetPolicy(policy.Compile(in(8080), e.r.Policy()))
				waitTrips(trips.Load() + 1000)
				close(stop)
				if err := <-done; err != nil {
					t.Fatalf("the allowed connection broke across the change: %v", err)
				}
				if err := cut.roundTrip(1, deniedWait); err == nil {
					t.Errorf("the connection the new policy denies carried on")
				}
				if connectsWith(t, c.dial, dst, 9090) {
					t.Errorf("a new connection to the denied port opened")
				}
			})
		}
	}
}

// The sandbox pod's addresses (newSandboxPod).
var (
	podS4 = netip.MustParseAddr("10.244.1.30")
	podS6 = netip.MustParseAddr("2001:db8:0:1::30")
)

// sandboxAddr returns the sandbox pod's address of family's family.
func sandboxAddr(family netip.Addr) netip.Addr {
	if family.Is4() {
		return podS4
	}
	return podS6
}

// udpEchoServer echoes every datagram to addr:port inside n back, until t
// ends.
func udpEchoServer(t testing.TB, n ns.NetNS, addr netip.Addr, port uint16) {
	t.Helper()
	var pc net.PacketConn
	testutil.Do(t, n, func() error {
		var err error
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(addr, port).String())
		return err
	})
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 64<<10)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:k], from)
		}
	}()
}

// udpEchoes reports whether a datagram of size bytes from n to addr:port
// comes back whole, trying up to tries times (a datagram may be lost on a
// busy machine); false when none came back within deniedWait.
func udpEchoes(t *testing.T, n ns.NetNS, addr netip.Addr, port uint16, size, tries int) bool {
	t.Helper()
	var c net.Conn
	testutil.Do(t, n, func() error {
		var err error
		c, err = net.Dial("udp", netip.AddrPortFrom(addr, port).String())
		return err
	})
	defer c.Close()
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	buf := make([]byte, size+1)
	for try := range tries {
		msg[0] = byte(try)
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("send %d bytes to %s port %d: %v", size, addr, port, err)
		}
		c.SetReadDeadline(time.Now().Add(deniedWait))
		for {
			k, err := c.Read(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				break
			}
			if err != nil {
				t.Fatalf("receive from %s port %d: %v", addr, port, err)
			}
			if k == size && string(buf[:k]) == string(msg) {
				return true
			}
		}
	}
	return false
}

// TestPolicyFragments proves that policy lets a UDP datagram larger than
// the links' MTU through whole, both ways, when its flow is allowed: its
// later fragments carry no ports, and they pass as the first one did
// (pod b takes a's datagrams on UDP 53 only, pod a takes nothing but
// replies), in both families. A flow policy denies stays denied, however
// it is cut.
func TestPolicyFragments(t *testing.T) {
	e := newEnv(t, dualStackConfig(false))
	allow := allowFrom("b", "a")
	udp := corev1.ProtocolUDP
	port := intstr.FromInt32(53)
	allow.Spec.Ingress[0].Ports = []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &port}}
	for _, f := range families {
		udpEchoServer(t, e.b.ns, f.b, 53)
		udpEchoServer(t, e.b.ns, f.b, 54)
		udpEchoServer(t, e.a.ns, f.a, 53)
	}
	for _, f := range families {
		if !udpEchoes(t, e.a.ns, f.b, 54, 4000, 3) {
			t.Fatalf("%s: a datagram in fragments does not come back without policy", f.name)
		}
	}
	e.r.SetPolicy(policy.Compile(policyInput(denyIngress, allow), nil))
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			for _, c := range []struct {
				what string
				from ns.NetNS
				to   netip.Addr
				port uint16
				size int
				want bool
			}{
				{"a to b, allowed port, one packet", e.a.ns, f.b, 53, 1000, true},
				{"a to b, allowed port, fragments", e.a.ns, f.b, 53, 4000, true},
				{"a to b, other port, fragments", e.a.ns, f.b, 54, 4000, false},
				{"b to a, fragments", e.b.ns, f.a, 53, 4000, false},
			} {
				tries := 1 // a denied datagram: one wait for nothing
				if c.want {
					tries = 3
				}
				if got := udpEchoes(t, c.from, c.to, c.port, c.size, tries); got != c.want {
					t.Errorf("%s: echoed %v, want %v", c.what, got, c.want)
				}
			}
		})
	}
}
