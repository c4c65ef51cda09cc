package router

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/internal/testutil"
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
			done := make(chan int64, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					done <- -1
					return
				}
				defer c.Close()
				n, _ := io.Copy(io.Discard, c)
				done <- n
			}()
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
