package router

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/policy"
)

// BenchmarkForwardKernelPods streams TCP from one kernel pod to another
// through the router (TAP -> gVisor forwarding -> TAP), 1 MiB per
// iteration, for profiling the forwarding path. "plain" TAP devices have no
// virtio-net header (the kernel segments and checksums every packet);
// "vnet" ones are set up as the CNI plugin and the agent set them up
// (offloads, TCP super-packets forwarded whole):
//
//	go test -run '^$' -bench ForwardKernelPods -benchtime 512x -cpuprofile cpu.out ./pkg/router
func BenchmarkForwardKernelPods(b *testing.B) {
	for _, fam := range []struct {
		name     string
		src, dst netip.Addr
		vnet     bool
	}{
		{"plain/ipv4", podA4, podB4, false}, {"plain/ipv6", podA6, podB6, false},
		{"vnet/ipv4", podA4, podB4, true}, {"vnet/ipv6", podA6, podB6, true},
	} {
		b.Run(fam.name, func(b *testing.B) {
			var e struct{ a, b *kernelPod }
			_, e.a, e.b = newPodPair(b, fam.vnet, fam.vnet)
			var ln net.Listener
			testutil.Do(b, e.b.ns, func() error {
				var err error
				ln, err = net.Listen("tcp", netip.AddrPortFrom(fam.dst, 0).String())
				return err
			})
			defer ln.Close()
			done := sinkOne(ln)
			var c net.Conn
			testutil.Do(b, e.a.ns, func() error {
				var err error
				c, err = (&net.Dialer{Timeout: ioDeadline}).Dial("tcp", ln.Addr().String())
				return err
			})
			defer c.Close()
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.(*net.TCPConn).CloseWrite()
			n := <-done
			d := time.Since(start)
			b.StopTimer()
			if n != int64(b.N)*int64(len(buf)) {
				b.Fatalf("received %d bytes, want %d", n, int64(b.N)*int64(len(buf)))
			}
			b.ReportMetric(float64(n)*8/d.Seconds()/1e9, "Gbit/s")
		})
	}
}

// BenchmarkForwardPolicies streams TCP (1 MiB per iteration) and makes
// round trips (one line per iteration) between two kernel pods on the fast
// path, set up as the CNI plugin sets them up, with no policy snapshot and
// with 0, 100 and 1000 policies selecting both pods (each letting in
// another pod on a port of its own; one lets a reach b). Compare each
// with "none" in the same run:
//
//	go test -run '^$' -bench ForwardPolicies -benchtime 256x ./pkg/router
func BenchmarkForwardPolicies(b *testing.B) {
	testutil.RequireRoot(b)
	r := newHostRouter(b, testutil.NewNS(b), dualStackConfig(false))
	pa := newKernelPodWith(b, r, "pod-a", true, podA4, podA6)
	pb := newKernelPodWith(b, r, "pod-b", true, podB4, podB6)
	echoServer(b, pb.ns, podB4, 8080)
	var ln net.Listener
	testutil.Do(b, pb.ns, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(podB4, 8081).String())
		return err
	})
	defer ln.Close()
	serveEach(ln, func(c net.Conn) { io.Copy(io.Discard, c) })
	for _, n := range []int{-1, 0, 100, 1000} {
		name := fmt.Sprintf("policies=%d", n)
		if n < 0 {
			name = "policies=none"
		}
		if n < 0 {
			r.SetPolicy(nil)
		} else {
			r.SetPolicy(policy.Compile(scalePolicies(n), r.Policy()))
		}
		b.Run("stream/"+name, func(b *testing.B) {
			c, err := dialFrom(pa.ns, podB4, 8081, ioDeadline)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			start := time.Now()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)*float64(len(buf))*8/time.Since(start).Seconds()/1e9, "Gbit/s")
		})
		b.Run("rr/"+name, func(b *testing.B) {
			c, err := dialFrom(pa.ns, podB4, 8080, ioDeadline)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			ec := newEchoConn(c)
			for i := range b.N {
				if err := ec.roundTrip(i, ioDeadline); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// scalePolicies is newPodPair's pods (default/a, default/b) among 98
// others, and n policies selecting both: policy i lets pod (i mod 98) in
// on TCP port 10000+i; the first also lets a reach b on 8080 and 8081.
func scalePolicies(n int) policy.Input {
	in := policyInput()
	for i := 0; i < 98; i++ {
		in.Pods = append(in.Pods, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: fmt.Sprintf("p%d", i), Labels: map[string]string{"app": fmt.Sprintf("p%d", i)}},
			Status:     corev1.PodStatus{PodIPs: []corev1.PodIP{{IP: netip.AddrFrom4([4]byte{10, 244, 1, byte(100 + i)}).String()}}},
		})
	}
	both := metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{
		{Key: "app", Operator: metav1.LabelSelectorOpIn, Values: []string{"a", "b"}}}}
	for i := 0; i < n; i++ {
		port := intstr.FromInt32(int32(10000 + i))
		np := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: fmt.Sprintf("np%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: both,
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("p%d", i%98)}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &port}},
				}},
			},
		}
		if i == 0 {
			np.Spec.Ingress = append(np.Spec.Ingress, bFromA(8080, 8081).Spec.Ingress...)
		}
		in.Policies = append(in.Policies, np)
	}
	return in
}
