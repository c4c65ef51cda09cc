package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The MTU the agent gives sandbox links by default (its --shm-mtu), and the
// one of kernel pods' links and the uplink in the tests' conflist and
// --mtu.
const (
	shmMTU    = 65000
	kernelMTU = 1500
	uplinkMTU = 1500
	// narrowMTU is the host's link to the outside in TestPathMTU.
	narrowMTU = 1400
)

// TestPathMTU: sandbox links carry large packets while the uplink keeps
// 1500 bytes, and kernel pods' links either (each pod's link and CNI result
// say its MTU), and TCP finds every path's MTU over IPv4 and IPv6: between
// sandboxes (64 KiB segments), between a sandbox and a kernel pod or the
// host (the peers' MSS), and beyond the node over a host link narrower than
// the outside's MSS says, where the host answers the pods' packets with
// ICMP "fragmentation needed" or "packet too big" through the uplink and
// the router, and the sender's TCP (gVisor's in a sandbox, the kernel's in
// a kernel pod) sends smaller segments. Every transfer is verified. A
// kernel pod's UDP datagram too large for the uplink gets the router's
// ICMP error, after which the pod's kernel fragments it to fit.
func TestPathMTU(t *testing.T) {
	t.Run("kernel pods at 1500", func(t *testing.T) { testPathMTU(t, kernelMTU) })
	// Kernel pods may take a large MTU too (the conflist's mtu) while the
	// uplink keeps 1500: the router clamps the MSS of their SYNs crossing
	// the uplink, and answers what else is too big for it.
	t.Run("kernel pods at 65000", func(t *testing.T) { testPathMTU(t, shmMTU) })
}

func testPathMTU(t *testing.T, kernelMTU int) {
	n := newNode(t, node.Options{PodMTU: kernelMTU})
	ctx := testContext(t)
	k1, k2, s1, s2 := fourPods(t, ctx, n)
	for _, p := range []struct {
		pod  *node.Pod
		want int
	}{{k1, kernelMTU}, {s1, shmMTU}, {s2, shmMTU}} {
		if got := p.pod.Result.Interfaces[0].Mtu; got != p.want {
			t.Errorf("%s: the CNI result's MTU is %d, want %d", p.pod.Name, got, p.want)
		}
		if got, err := linkMTU(p.pod.NS, node.IfName); err != nil || got != p.want {
			t.Errorf("%s: %s's MTU in the pod is %d (%v), want %d", p.pod.Name, node.IfName, got, err, p.want)
		}
	}
	if err := n.Host.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(node.HostOutsideVeth)
		if err == nil {
			err = netlink.LinkSetMTU(l, narrowMTU)
		}
		return err
	}); err != nil {
		t.Fatalf("narrow the host's link to the outside: %v", err)
	}
	outside := n.OutsidePeer()
	for _, tc := range []struct {
		name     string
		src, dst *node.Peer
	}{
		{"sandbox-sandbox", n.PodPeer(s1), n.PodPeer(s2)},
		{"sandbox-kernel", n.PodPeer(s1), n.PodPeer(k1)},
		{"kernel-sandbox", n.PodPeer(k1), n.PodPeer(s2)},
		{"sandbox-host", n.PodPeer(s2), n.HostPeer()},
		{"host-sandbox", n.HostPeer(), n.PodPeer(s1)},
		{"kernel-kernel", n.PodPeer(k1), n.PodPeer(k2)},
		{"kernel-host", n.PodPeer(k2), n.HostPeer()},
		{"sandbox-outside", n.PodPeer(s1), outside},
		{"kernel-outside", n.PodPeer(k1), outside},
	} {
		for _, v6 := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/%s", tc.name, map[bool]string{false: "IPv4", true: "IPv6"}[v6]), func(t *testing.T) {
				tr, err := n.Transfer(ctx, tc.src, tc.dst, v6, 8<<20)
				if err != nil {
					t.Fatal(err)
				}
				if got, want := tr.From, n.ExpectedSource(tc.src, tc.dst, v6); got != want {
					t.Errorf("the receiver saw source %s, want %s", got, want)
				}
			})
		}
	}
	if kernelMTU > uplinkMTU {
		for _, v6 := range []bool{false, true} {
			if err := udpThroughUplink(k1.NS, n.Host, k1.Addr(v6), n.Gateway(v6), 3000); err != nil {
				t.Errorf("UDP from a kernel pod at MTU %d to the host (IPv6 %t): %v", kernelMTU, v6, err)
			}
		}
	}
}

// udpThroughUplink sends a datagram of size bytes from src in netns from
// to dst in netns to, again until one arrives whole (the first is answered
// with ICMP by the router when it is too big for the uplink, and the
// sender's kernel fragments the next), at most 10 times.
func udpThroughUplink(from, to ns.NetNS, src, dst netip.Addr, size int) error {
	var ln, c *net.UDPConn
	if err := to.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 0)))
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	if err := from.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), ln.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	msg := bytes.Repeat([]byte{0x5a}, size)
	buf := make([]byte, size+1)
	for range 10 {
		if _, err := c.Write(msg); err != nil && !errors.Is(err, syscall.EMSGSIZE) {
			return err
		}
		ln.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, _, err := ln.ReadFromUDP(buf)
		if err == nil {
			if n != size || !bytes.Equal(buf[:n], msg) {
				return fmt.Errorf("received %d bytes, want the %d sent", n, size)
			}
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
	}
	return errors.New("no datagram arrived in 10 tries")
}

// linkMTU returns the MTU of the interface name in netns.
func linkMTU(netns ns.NetNS, name string) (int, error) {
	var mtu int
	err := netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		mtu = l.Attrs().MTU
		return nil
	})
	return mtu, err
}
