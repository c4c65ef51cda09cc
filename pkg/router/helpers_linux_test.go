package router

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/endpoint/tap"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// Safety limits. They bound how long a broken test hangs; no test passes or
// fails on how fast something happened.
const (
	// pingWait bounds the wait for one echo reply.
	pingWait = 2 * time.Second
	// pingTries is how many echo requests a ping sends before giving up.
	pingTries = 5
	// ioDeadline bounds a whole TCP transfer.
	ioDeadline = 2 * time.Minute
	// transferSize is the size of each TCP transfer: 10 MiB.
	transferSize = 10 << 20
)

// gatewayMAC is the router's MAC on every test pod link.
var gatewayMAC = tcpip.LinkAddress("\xee\xee\xee\xee\xee\xee")

// sysctl writes a value under /proc/sys/net; call it inside the namespace.
func sysctl(key, value string) error {
	p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// newHostRouter creates the router while running inside host, so its uplink
// and nftables table live there, starts it and closes it when t ends.
func newHostRouter(t testing.TB, host ns.NetNS, cfg Config) *Router {
	t.Helper()
	var r *Router
	testutil.Do(t, host, func() error {
		var err error
		if r, err = New(cfg, testutil.Logger(t)); err != nil {
			return err
		}
		return nil
	})
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("close router: %v", err)
		}
	})
	if err := r.Start(); err != nil {
		t.Fatalf("start router: %v", err)
	}
	return r
}

// kernelPod is a pod with a kernel network stack: a TAP device eth0 in its
// own namespace, whose fd the router drives.
type kernelPod struct {
	ns    ns.NetNS
	id    string
	fd    int
	ep    *tap.Endpoint
	mac   tcpip.LinkAddress
	addrs []netip.Addr
}

// newKernelPod creates a pod namespace with a TAP eth0 carrying addrs, its
// default routes via the link-local gateway, and attaches it to r as link
// id. The link is removed, and the TAP fd closed, when t ends.
func newKernelPod(t testing.TB, r *Router, id string, addrs ...netip.Addr) *kernelPod {
	t.Helper()
	return newKernelPodWith(t, r, id, false, addrs...)
}

// newKernelPodWith is newKernelPod; with vnet the TAP device is set up as
// the CNI plugin and the agent set it up: virtio-net header, the kernel's
// offloads (TSO, partial checksums) and a Forwarding endpoint.
func newKernelPodWith(t testing.TB, r *Router, id string, vnet bool, addrs ...netip.Addr) *kernelPod {
	t.Helper()
	p := &kernelPod{ns: testutil.NewNS(t), id: id, addrs: addrs}
	testutil.Do(t, p.ns, func() error {
		// The pod's link-local address must be usable at once for NDP.
		if err := sysctl("net.ipv6.conf.default.accept_dad", "0"); err != nil {
			return err
		}
		fd, err := openPodTAP(vnet)
		if err != nil {
			return err
		}
		p.fd = fd
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		p.mac = tcpip.LinkAddress(l.Attrs().HardwareAddr)
		for _, a := range addrs {
			addr := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(a, a.BitLen()))}
			if a.Is6() {
				addr.Flags = unix.IFA_F_NODAD
			}
			if err := netlink.AddrAdd(l, addr); err != nil {
				return fmt.Errorf("add %s: %w", a, err)
			}
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		for _, a := range addrs {
			gw := GatewayV6
			if a.Is4() {
				gw = GatewayV4
			}
			route := &netlink.Route{
				LinkIndex: l.Attrs().Index,
				Gw:        gw.AsSlice(),
				Flags:     int(netlink.FLAG_ONLINK),
			}
			if err := netlink.RouteAdd(route); err != nil {
				return fmt.Errorf("default via %s: %w", gw, err)
			}
		}
		return nil
	})
	t.Cleanup(func() { unix.Close(p.fd) })

	ep, err := tap.New(tap.Options{FD: p.fd, MTU: 1500, EthernetHeader: true, LinkAddress: gatewayMAC,
		VnetHdr: vnet, Forwarding: vnet})
	if err != nil {
		t.Fatalf("TAP endpoint: %v", err)
	}
	p.ep = ep
	if err := r.AddLink(id, ep, Link{Addrs: addrs, PodMAC: p.mac, GatewayMAC: gatewayMAC}); err != nil {
		t.Fatalf("add link: %v", err)
	}
	// Registered after the fd's cleanup, so it runs before it.
	t.Cleanup(func() {
		if err := r.RemoveLink(id); err != nil {
			t.Errorf("remove link %s: %v", id, err)
		}
	})
	return p
}

// openPodTAP opens eth0 as a plain TAP device, or with vnet as the CNI
// plugin does.
func openPodTAP(vnet bool) (int, error) {
	if !vnet {
		return openTunTap("eth0", unix.IFF_TAP)
	}
	f, err := tuntap.Open("eth0", tuntap.Options{VnetHdr: true, Offload: true})
	if err != nil {
		return -1, err
	}
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd, err = unix.Dup(int(u)) }); err != nil {
		return -1, err
	}
	return fd, err
}

// addr returns p's address of dst's family.
func (p *kernelPod) addr(family netip.Addr) netip.Addr {
	for _, a := range p.addrs {
		if a.Is4() == family.Is4() {
			return a
		}
	}
	panic("pod has no address of that family")
}

var pingID atomic.Uint32

// ping sends ICMP echo requests to dst from inside n until one is answered.
// It returns an error when no reply came after pingTries requests, or when
// an ICMP error came back instead.
func ping(n ns.NetNS, dst netip.Addr) error {
	return pingN(n, dst, pingTries)
}

// pingOnce is ping with a single echo request, for pings expected to fail.
func pingOnce(n ns.NetNS, dst netip.Addr) error {
	return pingN(n, dst, 1)
}

// pingN is ping with tries echo requests.
func pingN(n ns.NetNS, dst netip.Addr, tries int) error {
	network, laddr, proto := "ip4:icmp", "0.0.0.0", 1 // IANA protocol 1: ICMP
	var reqType, replyType icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if dst.Is6() {
		network, laddr, proto = "ip6:ipv6-icmp", "::", 58 // IANA protocol 58: ICMPv6
		reqType, replyType = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	var c net.PacketConn
	if err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = net.ListenPacket(network, laddr)
		return err
	}); err != nil {
		return fmt.Errorf("ping %s: listen: %w", dst, err)
	}
	defer c.Close()

	id := int(pingID.Add(1) & 0xffff)
	payload := []byte("shm-cni router test")
	buf := make([]byte, 1500)
	for seq := 1; seq <= tries; seq++ {
		msg := icmp.Message{Type: reqType, Body: &icmp.Echo{ID: id, Seq: seq, Data: payload}}
		b, err := msg.Marshal(nil) // the kernel sums ICMPv6 on raw sockets
		if err != nil {
			return err
		}
		if _, err := c.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
			return fmt.Errorf("ping %s: send: %w", dst, err)
		}
		c.SetReadDeadline(time.Now().Add(pingWait))
		for {
			n, from, err := c.ReadFrom(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				return fmt.Errorf("ping %s: receive: %w", dst, err)
			}
			m, err := icmp.ParseMessage(proto, buf[:n])
			if err != nil {
				continue
			}
			switch body := m.Body.(type) {
			case *icmp.Echo:
				fromIP, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
				if m.Type == replyType && body.ID == id && body.Seq == seq &&
					fromIP.Unmap() == dst && bytes.Equal(body.Data, payload) {
					return nil
				}
			case *icmp.DstUnreach, *icmp.TimeExceeded:
				if quotesEcho(body, id) {
					return fmt.Errorf("ping %s: ICMP %v from %v", dst, m.Type, from)
				}
			}
		}
	}
	return fmt.Errorf("ping %s: no reply to %d echo requests", dst, tries)
}

// quotesEcho reports whether an ICMP error quotes one of our echo requests.
func quotesEcho(body icmp.MessageBody, id int) bool {
	var data []byte
	switch b := body.(type) {
	case *icmp.DstUnreach:
		data = b.Data
	case *icmp.TimeExceeded:
		data = b.Data
	}
	// Quoted IP header, then the echo: ID at offset 4 of the ICMP header.
	hlen := 40
	if len(data) > 0 && data[0]>>4 == 4 {
		hlen = int(data[0]&0x0f) * 4
	}
	return len(data) >= hlen+6 && int(data[hlen+4])<<8|int(data[hlen+5]) == id
}

// transferResult is what a TCP server saw.
type transferResult struct {
	remote netip.Addr
	sum    [sha256.Size]byte
	n      int64
	err    error
}

// tcpTransfer sends transferSize seeded random bytes over TCP from a client
// in clientNS to a server listening on dst inside serverNS. It fails t unless
// the server received exactly what was sent, and returns the client address
// the server saw.
func tcpTransfer(t testing.TB, clientNS, serverNS ns.NetNS, dst netip.Addr) netip.Addr {
	t.Helper()
	var ln net.Listener
	testutil.Do(t, serverNS, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
		return err
	})
	defer ln.Close()
	results := make(chan transferResult, 1)
	go func() {
		var res transferResult
		defer func() { results <- res }()
		c, err := ln.Accept()
		if err != nil {
			res.err = err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(ioDeadline))
		res.remote = c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		h := sha256.New()
		res.n, res.err = io.Copy(h, c)
		copy(res.sum[:], h.Sum(nil))
	}()

	data := make([]byte, transferSize)
	rand.New(rand.NewSource(1)).Read(data)
	want := sha256.Sum256(data)
	var c net.Conn
	testutil.Do(t, clientNS, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: ioDeadline}).Dial("tcp", ln.Addr().String())
		return err
	})
	c.SetDeadline(time.Now().Add(ioDeadline))
	if _, err := c.Write(data); err != nil {
		c.Close()
		t.Fatalf("send to %s: %v", ln.Addr(), err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	res := <-results
	c.Close()
	if res.err != nil {
		t.Fatalf("receive at %s: %v", ln.Addr(), res.err)
	}
	if res.n != transferSize || res.sum != want {
		t.Fatalf("server at %s got %d bytes (sha256 %x), want %d bytes (sha256 %x)",
			ln.Addr(), res.n, res.sum, transferSize, want)
	}
	return res.remote
}

// goroutinesIn counts the goroutines with a frame of function fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			count++
		}
	}
	return count
}

// goroutinesSettle returns the number of goroutines in fn once it is want,
// or after 10 seconds. A reader that RemoveLink or Close waited for has
// called its WaitGroup's Done from a deferred call and may still be
// returning: its stack shows fn a moment longer. A reader that never
// stops still shows.
func goroutinesSettle(fn string, want int) int {
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := goroutinesIn(fn)
		if got == want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dispatchLoop is the TAP/TUN endpoints' reader goroutine (pod links and
// the uplink).
const dispatchLoop = "tap.(*Endpoint).readLoop"
