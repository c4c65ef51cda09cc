package router

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/netip"
	"testing"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// newPodPair starts a router in a fresh host namespace with two kernel pods,
// a (podA4, podA6) and b (podB4, podB6), whose TAP devices have a virtio-net
// header and the kernel's offloads as the CNI plugin sets them up when
// vnetA, vnetB. The host namespace is returned as a pod without a link,
// for streamTCP.
func newPodPair(t testing.TB, vnetA, vnetB bool) (host, a, b *kernelPod) {
	t.Helper()
	testutil.RequireRoot(t)
	host = &kernelPod{ns: testutil.NewNS(t), id: "host"}
	r := newHostRouter(t, host.ns, dualStackConfig(false))
	for _, p := range dualStackConfig(false).PodCIDRs {
		gw, _ := NodeGateway(p)
		host.addrs = append(host.addrs, gw)
	}
	a = newKernelPodWith(t, r, "pod-a", vnetA, podA4, podA6)
	b = newKernelPodWith(t, r, "pod-b", vnetB, podB4, podB6)
	return host, a, b
}

// streamTCP sends n bytes of seeded random data over TCP from pod src to
// dst's address of family's kind and returns what dst received.
func streamTCP(t testing.TB, src, dst *kernelPod, family netip.Addr, data []byte) []byte {
	t.Helper()
	var ln net.Listener
	testutil.Do(t, dst.ns, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst.addr(family), 0).String())
		return err
	})
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		var buf bytes.Buffer
		buf.Grow(len(data))
		io.Copy(&buf, c)
		got <- buf.Bytes()
	}()
	var c net.Conn
	testutil.Do(t, src.ns, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: ioDeadline}).Dial("tcp", ln.Addr().String())
		return err
	})
	if _, err := c.Write(data); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	c.Close()
	return <-got
}

// TestForwardGSOKernelPods sends TCP data between two kernel pods whose
// TAP devices have offloads, through the router, and checks that every byte
// arrives intact and that the kernel's super-packets crossed the router
// whole (GSO pass-through) or, towards a TAP without a virtio-net header,
// were cut into segments by the router's fast path.
func TestForwardGSOKernelPods(t *testing.T) {
	for _, tc := range []struct {
		name  string
		vnetB bool
	}{
		{"to-vnet-tap", true},
		{"to-plain-tap", false},
	} {
		for _, fam := range []netip.Addr{podB4, podB6} {
			t.Run(fmt.Sprintf("%s/ipv%d", tc.name, map[bool]int{true: 4, false: 6}[fam.Is4()]), func(t *testing.T) {
				_, a, b := newPodPair(t, true, tc.vnetB)
				data := make([]byte, 16<<20)
				rand.New(rand.NewSource(1)).Read(data)
				got := streamTCP(t, a, b, fam, data)
				if len(got) != len(data) || sha256.Sum256(got) != sha256.Sum256(data) {
					t.Fatalf("received %d bytes (sha256 %x), want %d (sha256 %x)",
						len(got), sha256.Sum256(got), len(data), sha256.Sum256(data))
				}
				passed := a.ep.OffloadStats().RxGSOPassed.Load()
				if passed == 0 {
					t.Errorf("pod a's link passed no super-packet whole (RxGSOPassed 0)")
				}
				if tc.vnetB {
					if n := b.ep.OffloadStats().TxGSOPackets.Load(); n == 0 {
						t.Errorf("pod b's link wrote no super-packet whole (TxGSOPackets 0); a passed %d", passed)
					}
				} else if n := b.ep.OffloadStats().TxSoftwareGSO.Load(); n != 0 {
					// The router's fast path cuts them (splitSuper).
					t.Errorf("pod b's link segmented %d super-packets (TxSoftwareGSO); the router should have cut the %d a passed", n, passed)
				}
				if d := b.ep.Stats().TxDrops.Load(); d != 0 {
					t.Errorf("pod b's link dropped %d frames", d)
				}
			})
		}
	}
}

// TestForwardGSOHost sends TCP data from the host to a kernel pod and back
// through the router's uplink, whose TUN device has offloads too, and checks
// that every byte arrives intact and that super-packets crossed whole in
// both directions.
func TestForwardGSOHost(t *testing.T) {
	for _, fam := range []netip.Addr{podB4, podB6} {
		t.Run(fmt.Sprintf("ipv%d", map[bool]int{true: 4, false: 6}[fam.Is4()]), func(t *testing.T) {
			host, _, b := newPodPair(t, true, true)
			data := make([]byte, 16<<20)
			rand.New(rand.NewSource(2)).Read(data)
			for _, dir := range []struct {
				name     string
				src, dst *kernelPod
			}{{"host->pod", host, b}, {"pod->host", b, host}} {
				got := streamTCP(t, dir.src, dir.dst, fam, data)
				if len(got) != len(data) || sha256.Sum256(got) != sha256.Sum256(data) {
					t.Fatalf("%s: received %d bytes, want %d intact", dir.name, len(got), len(data))
				}
			}
			if n := b.ep.OffloadStats().TxGSOPackets.Load(); n == 0 {
				t.Errorf("host->pod: the pod's link wrote no super-packet whole (TxGSOPackets 0)")
			}
			if n := b.ep.OffloadStats().RxGSOPassed.Load(); n == 0 {
				t.Errorf("pod->host: the pod's link passed no super-packet whole (RxGSOPassed 0)")
			}
		})
	}
}
