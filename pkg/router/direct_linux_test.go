package router

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/endpoint/tap"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// More sandbox pods' addresses (newSandboxPodWith).
var (
	podS14 = netip.MustParseAddr("10.244.1.31")
	podS16 = netip.MustParseAddr("2001:db8:0:1::31")
	podS24 = netip.MustParseAddr("10.244.1.32")
	podS26 = netip.MustParseAddr("2001:db8:0:1::32")
	podS34 = netip.MustParseAddr("10.244.1.33")
	podS36 = netip.MustParseAddr("2001:db8:0:1::33")
)

// serveStream echoes every byte of every connection to ln back, until ln is
// closed.
func serveStream(ln net.Listener) {
	serveEach(ln, func(c net.Conn) { io.Copy(c, c) })
}

// serveEach serves every connection to ln with serve, on a goroutine of its
// own, and closes it after; until ln is closed.
func serveEach(ln net.Listener, serve func(net.Conn)) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				serve(c)
			}()
		}
	}()
}

// sinkOne reads the first connection to ln to its end and sends how many
// bytes it read, or -1 when none came.
func sinkOne(ln net.Listener) <-chan int64 {
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
	return done
}

// echoStream sends n random bytes on c and reports whether the same bytes
// came back, within wait.
func echoStream(t *testing.T, c net.Conn, n int, wait time.Duration) {
	t.Helper()
	c.SetDeadline(time.Now().Add(wait))
	want := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{byte(n)})
	rng.Read(want)
	sent := make(chan error, 1)
	go func() {
		_, err := c.Write(want)
		sent <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read back: %v", err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("send: %v", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < n && got[i] == want[i] {
			i++
		}
		t.Fatalf("%d bytes came back different from byte %d on", n, i)
	}
}

// TestSandboxOneCopy proves with real streams that a sandbox's large TCP
// segments cross the router in one copy (direct.go), bytes intact, in both
// families and both directions of an echo, to every link that takes them
// with a partial checksum: another sandbox that takes checksum offload (from
// the one's shared memory to the other's), a kernel pod's TAP device with a
// virtio-net header and the uplink to a host beyond the node (one writev
// from the sandbox's memory); the receiving links count them. Segments held
// in a sandbox's memory reach every other destination whole, copied the
// usual way: a kernel pod on a plain TAP device, a sandbox without checksum
// offload, a sandbox with a bandwidth limit (whose link is never written in
// one copy).
func TestSandboxOneCopy(t *testing.T) {
	cfg := dualStackConfig(false)
	cfg.OneCopy = true
	e := newEnv(t, cfg)
	src := newSandboxPodWith(t, e.r, "pod-s", sandboxOpts{mac: 0x30, rxGSO: true}, podS4, podS6)
	offload := newSandboxPodWith(t, e.r, "pod-s1", sandboxOpts{mac: 0x31, rxGSO: true}, podS14, podS16)
	plain := newSandboxPodWith(t, e.r, "pod-s2", sandboxOpts{mac: 0x32}, podS24, podS26)
	limit := linkspec.Bandwidth{IngressRate: 100_000_000_000, IngressBurst: 8 << 20, EgressRate: 100_000_000_000, EgressBurst: 8 << 20}
	limited := newSandboxPodWith(t, e.r, "pod-s3", sandboxOpts{mac: 0x33, rxGSO: true, bandwidth: limit}, podS34, podS36)
	vnet := newKernelPodWith(t, e.r, "pod-v", true, podV4, podV6)
	uplink := e.r.up.fast.direct.(*tap.Endpoint)
	sandbox := func(p *sandboxPod) func() uint64 { return p.srv.Stats().TxOneCopy.Load }
	const port, size = 7000, 8 << 20
	for _, f := range families {
		serve := func(n ns.NetNS, a netip.Addr) {
			testutil.Do(t, n, func() error {
				ln, err := net.Listen("tcp", netip.AddrPortFrom(a, port).String())
				if err == nil {
					t.Cleanup(func() { ln.Close() })
					serveStream(ln)
				}
				return err
			})
		}
		serve(e.b.ns, f.b)
		serve(vnet.ns, vnet.addr(f.a))
		serve(e.outside, f.outside)
		for _, c := range []struct {
			name    string
			dst     *sandboxPod // nil: to
			to      netip.Addr
			oneCopy func() uint64 // the receiving link's one-copy frames
			want    bool
		}{
			{"to a sandbox with checksum offload", offload, netip.Addr{}, sandbox(offload), true},
			{"to a sandbox without checksum offload", plain, netip.Addr{}, sandbox(plain), false},
			{"to a sandbox with a bandwidth limit", limited, netip.Addr{}, sandbox(limited), false},
			{"to a kernel pod with offloads", nil, vnet.addr(f.a), vnet.ep.Stats().TxOneCopy.Load, true},
			{"to a kernel pod without offloads", nil, f.b, nil, false},
			{"to a host beyond the node", nil, f.outside, uplink.Stats().TxOneCopy.Load, true},
		} {
			t.Run(f.name+"/"+c.name, func(t *testing.T) {
				to := c.to
				if c.dst != nil {
					to = c.dst.addrs[0]
					if f.a.Is6() {
						to = c.dst.addrs[1]
					}
					serveStream(c.dst.listen(t, to, port))
				}
				var before uint64
				if c.oneCopy != nil {
					before = c.oneCopy()
				}
				conn, err := src.dial(to, port, ioDeadline)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				echoStream(t, conn, size, 10*ioDeadline)
				if c.oneCopy == nil {
					return
				}
				// At least a frame per 64 KiB on average, with room for
				// smaller ones.
				n, min := c.oneCopy()-before, uint64(size/sandboxMTU/2)
				if c.want && n < min {
					t.Errorf("%d frames written in one copy for %d bytes, want at least %d", n, size, min)
				}
				if !c.want && n != 0 {
					t.Errorf("%d frames written in one copy, want none", n)
				}
			})
		}
	}
}

// A kernel pod's addresses on a TAP device with offloads.
var (
	podV4 = netip.MustParseAddr("10.244.1.40")
	podV6 = netip.MustParseAddr("2001:db8:0:1::40")
)

// BenchmarkSandboxToSandbox streams TCP from one sandbox's netstack to
// another's through the router, both on shared-memory links with the
// offloads the agent offers, 1 MiB per iteration: with one copy in the
// router (direct.go) and with two (out of the sender's memory, into the
// receiver's), in one process:
//
//	go test -run '^$' -bench SandboxToSandbox -benchtime 2000x ./pkg/router
func BenchmarkSandboxToSandbox(b *testing.B) {
	for _, c := range []struct {
		name string
		two  bool
	}{{"one-copy", false}, {"two-copies", true}} {
		b.Run(c.name, func(b *testing.B) {
			cfg := dualStackConfig(false)
			cfg.OneCopy = !c.two
			r := newHostRouter(b, testutil.NewNS(b), cfg)
			src := newSandboxPodWith(b, r, "pod-s", sandboxOpts{mac: 0x30, rxGSO: true}, podS4, podS6)
			dst := newSandboxPodWith(b, r, "pod-s1", sandboxOpts{mac: 0x31, rxGSO: true}, podS14, podS16)
			done := sinkOne(dst.listen(b, podS14, 7000))
			conn, err := src.dial(podS14, 7000, ioDeadline)
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			cpu0 := processCPU(b)
			b.ResetTimer()
			for range b.N {
				if _, err := conn.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			conn.Close()
			if n := <-done; n != int64(b.N)*int64(len(buf)) {
				b.Fatalf("received %d bytes, want %d", n, int64(b.N)*int64(len(buf)))
			}
			b.StopTimer()
			// The process's CPU time (both netstacks and the router) per
			// MiB: steadier than the rate on a busy machine.
			b.ReportMetric(float64(processCPU(b)-cpu0)/float64(time.Millisecond)/float64(b.N), "cpu-ms/MiB")
			if n := dst.srv.Stats().TxOneCopy.Load(); (n > 0) == c.two {
				b.Fatalf("%d frames in one copy", n)
			}
		})
	}
}

// processCPU returns the CPU time the process used so far.
func processCPU(t testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
