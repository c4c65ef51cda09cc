package policy

import (
	"fmt"
	"net/netip"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
)

// scaleInput is a cluster of 100 local pods in 10 namespaces and n
// policies, each selecting one pod and letting in TCP from a pod of
// another namespace on a port of its own, and one that lets everything in
// and out of every pod of the namespace "ns0"'s pod "p0" (the benchmarked
// pair's).
func scaleInput(n int) Input {
	in := Input{NodeName: "n1"}
	for i := 0; i < 10; i++ {
		in.Namespaces = append(in.Namespaces, namespace(fmt.Sprintf("ns%d", i), "idx", fmt.Sprint(i)))
	}
	for i := 0; i < 100; i++ {
		a4 := netip.AddrFrom4([4]byte{10, 1, byte(i / 256), byte(i)})
		a6 := netip.AddrFrom16([16]byte{0: 0xfd, 14: byte(i / 256), 15: byte(i)})
		in.Pods = append(in.Pods, pod(fmt.Sprintf("ns%d", i%10), fmt.Sprintf("p%d", i),
			labelMap("app", fmt.Sprintf("a%d", i)), []netip.Addr{a4, a6}))
	}
	for i := 0; i < n; i++ {
		in.Policies = append(in.Policies, netpol(fmt.Sprintf("ns%d", i%10), fmt.Sprintf("np%d", i),
			sel("app", fmt.Sprintf("a%d", i%100)), nil,
			from(ports(tcpPort(int32(1000+i))), podPeer(sel("app", fmt.Sprintf("a%d", (i+1)%100)), sel("idx", fmt.Sprint((i+1)%10)))), nil))
	}
	if n > 0 {
		in.Policies = append(in.Policies, netpol("ns0", "open", sel("app", "a0"),
			[]networkingv1.PolicyType{"Ingress", "Egress"},
			[]networkingv1.NetworkPolicyIngressRule{{}}, []networkingv1.NetworkPolicyEgressRule{{}}))
	}
	return in
}

// BenchmarkFromPod is the enforcer's cost per packet of an established
// TCP connection from pod p0 to pod p1, with no snapshot, and with 0, 100
// and 1000 policies (p0 isolated by every snapshot with policies, so each
// packet is a tracker hit), on one goroutine and on all.
//
//	go test -run '^$' -bench FromPod ./pkg/policy
func BenchmarkFromPod(b *testing.B) {
	src, dst := netip.AddrFrom4([4]byte{10, 1, 0, 0}), netip.AddrFrom4([4]byte{10, 1, 0, 1})
	for _, n := range []int{-1, 0, 100, 1000} {
		name := fmt.Sprintf("policies=%d", n)
		if n < 0 {
			name = "nil"
		}
		e, err := NewEnforcer(DefaultTrackerConfig, nil)
		if err != nil {
			b.Fatal(err)
		}
		if n >= 0 {
			e.Set(Compile(scaleInput(n), nil))
		}
		pkt := packet{src: src, dst: dst, proto: ProtoTCP, sport: 40000, dport: 80, flags: tcpAck}.bytes()
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				if !e.FromPod(pkt) {
					b.Fatal("denied")
				}
			}
		})
		b.Run(name+"/parallel", func(b *testing.B) {
			pkts := make([][]byte, 1024) // 1024 connections
			for i := range pkts {
				pkts[i] = packet{src: src, dst: dst, proto: ProtoTCP, sport: uint16(1024 + i), dport: 80, flags: tcpAck}.bytes()
			}
			b.RunParallel(func(pb *testing.PB) {
				var i int
				for pb.Next() {
					i++
					if !e.FromPod(pkts[i%len(pkts)]) {
						b.Fatal("denied")
					}
				}
			})
		})
	}
}

// BenchmarkCompile is a compilation of 1000 policies over 100 pods.
func BenchmarkCompile(b *testing.B) {
	in := scaleInput(1000)
	b.ReportAllocs()
	for range b.N {
		Compile(in, nil)
	}
}
