package tap

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// Addresses of the test links: the kernel ("pod") side is .1/::1, the
// gVisor (agent) side .2/::2.
var (
	podAddr4   = netip.MustParseAddr("10.99.0.1")
	agentAddr4 = netip.MustParseAddr("10.99.0.2")
	podAddr6   = netip.MustParseAddr("fd99::1")
	agentAddr6 = netip.MustParseAddr("fd99::2")
	agentMAC   = tcpip.LinkAddress("\x02\x00\x00\x00\x99\x02")
)

const testMTU = 1500

// kernelPod is a network namespace with a TUN/TAP device made by tuntap.Open,
// addressed and up: the kernel-stack pod.
type kernelPod struct {
	netns ns.NetNS
	file  *os.File
	name  string
}

func newKernelPod(t *testing.T, name string, opts tuntap.Options) *kernelPod {
	t.Helper()
	netns := testutil.NewNS(t)
	var f *os.File
	err := netns.Do(func(ns.NetNS) error {
		var err error
		if f, err = tuntap.Open(name, opts); err != nil {
			return err
		}
		for _, l := range []string{"lo", name} {
			link, err := netlink.LinkByName(l)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(link); err != nil {
				return fmt.Errorf("set %s up: %w", l, err)
			}
		}
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		for _, a := range []string{podAddr4.String() + "/24", podAddr6.String() + "/64"} {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				return err
			}
			addr.Flags = unix.IFA_F_NODAD
			if err := netlink.AddrAdd(link, addr); err != nil {
				return fmt.Errorf("add %s: %w", a, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("set up pod netns: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return &kernelPod{netns: netns, file: f, name: name}
}

// rawFD returns f's fd without switching f to blocking mode.
func rawFD(t *testing.T, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		t.Fatal(err)
	}
	return fd
}

// checkedLink wraps the endpoint under test so that every segment it marks
// as checksum-validated (the stack then skips verification) is verified
// here before it reaches the stack.
type checkedLink struct {
	*Endpoint
	checked, bad atomic.Uint64
}

func (c *checkedLink) Attach(d stack.NetworkDispatcher) {
	if d == nil {
		c.Endpoint.Attach(nil)
		return
	}
	c.Endpoint.Attach(&checkingDispatcher{NetworkDispatcher: d, link: c})
}

type checkingDispatcher struct {
	stack.NetworkDispatcher
	link *checkedLink
}

func (d *checkingDispatcher) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if pkt.RXChecksumValidated {
		d.link.checked.Add(1)
		b := pkt.Data().AsRange().ToSlice()
		if _, err := frametest.ParseSegment(b, proto == header.IPv6ProtocolNumber, false); err != nil {
			d.link.bad.Add(1)
		}
	}
	d.NetworkDispatcher.DeliverNetworkPacket(proto, pkt)
}

// newAgentStack returns a gVisor stack with one NIC on ep, addressed on the
// pod's subnets. At cleanup the NIC goes first and the endpoint is waited for
// outside the stack's lock: Stack.Wait (in Destroy) waits for link endpoints
// while holding that lock, which a reader delivering a packet may need.
func newAgentStack(t *testing.T, ep stack.LinkEndpoint, v6 bool) *stack.Stack {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	t.Cleanup(func() {
		s.RemoveNIC(1)
		ep.Wait()
		s.Destroy()
	})
	// Larger TCP buffers than the defaults let a single stream fill a
	// 64 KiB super-packet; the transfers would crawl otherwise.
	send := tcpip.TCPSendBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	recv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4096, Default: 1 << 20, Max: 8 << 20}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &send); err != nil {
		t.Fatal(err)
	}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &recv); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateNIC(1, ep); err != nil {
		t.Fatalf("create NIC: %v", err)
	}
	addrs := []netip.Prefix{netip.PrefixFrom(agentAddr4, 24)}
	if v6 {
		addrs = append(addrs, netip.PrefixFrom(agentAddr6, 64))
	}
	var routes []tcpip.Route
	for _, p := range addrs {
		proto := ipv4.ProtocolNumber
		if p.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		awp := tcpip.AddressWithPrefix{Address: tcpipx.Addr(p.Addr()), PrefixLen: p.Bits()}
		if err := s.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: awp}, stack.AddressProperties{}); err != nil {
			t.Fatalf("add %s: %v", p, err)
		}
		routes = append(routes, tcpip.Route{Destination: awp.Subnet(), NIC: 1})
	}
	s.SetRouteTable(routes)
	return s
}

// streamSeed seeds the pseudo-random bytes of the transfers.
var streamSeed = [32]byte{'t', 'a', 'p'}

// sendStream writes n pseudo-random bytes to w.
func sendStream(w io.Writer, n int) error {
	gen := rand.NewChaCha8(streamSeed)
	buf := make([]byte, 256<<10)
	for n > 0 {
		chunk := buf[:min(n, len(buf))]
		gen.Read(chunk)
		if _, err := w.Write(chunk); err != nil {
			return fmt.Errorf("write with %d bytes left: %w", n, err)
		}
		n -= len(chunk)
	}
	return nil
}

// checkStream reads r to EOF and checks that it carried exactly what
// sendStream(n) wrote.
func checkStream(r io.Reader, n int) error {
	gen := rand.NewChaCha8(streamSeed)
	buf := make([]byte, 256<<10)
	want := make([]byte, len(buf))
	total := 0
	for {
		k, err := r.Read(buf)
		if k > 0 {
			if total+k > n {
				return fmt.Errorf("received more than %d bytes", n)
			}
			gen.Read(want[:k])
			if !bytes.Equal(buf[:k], want[:k]) {
				return fmt.Errorf("bytes %d..%d differ from what was sent", total, total+k)
			}
			total += k
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read after %d bytes: %w", total, err)
		}
	}
	if total != n {
		return fmt.Errorf("received %d bytes, want %d", total, n)
	}
	return nil
}

// transferDeadline bounds a transfer so that a broken link fails the test
// instead of hanging it; it is not what the test measures.
const transferDeadline = 10 * time.Minute

// podToAgent sends n bytes from a kernel socket in the pod to a gVisor
// listener and verifies them.
func podToAgent(t *testing.T, s *stack.Stack, pod *kernelPod, dst netip.Addr, n int) {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if dst.Is6() {
		proto = ipv6.ProtocolNumber
	}
	ln, err := gonet.ListenTCP(s, tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(dst), Port: 5001}, proto)
	if err != nil {
		t.Fatalf("gvisor listen: %v", err)
	}
	defer ln.Close()
	var conn net.Conn
	if err := pod.netns.Do(func(ns.NetNS) error {
		// The socket belongs to the namespace it is created in; it can be
		// used from any goroutine afterwards.
		var err error
		conn, err = net.Dial("tcp", netip.AddrPortFrom(dst, 5001).String())
		return err
	}); err != nil {
		t.Fatalf("pod dial: %v", err)
	}
	conn.SetDeadline(time.Now().Add(transferDeadline))
	sent := make(chan error, 1)
	go func() {
		err := sendStream(conn, n)
		conn.Close()
		sent <- err
	}()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatalf("gvisor accept: %v", err)
	}
	defer srv.Close()
	srv.SetDeadline(time.Now().Add(transferDeadline))
	if err := checkStream(srv, n); err != nil {
		t.Errorf("pod to agent: %v", err)
	}
	if err := <-sent; err != nil {
		t.Errorf("pod send: %v", err)
	}
}

// agentToPod sends n bytes from a gVisor socket to a kernel listener in the
// pod and verifies them.
func agentToPod(t *testing.T, s *stack.Stack, pod *kernelPod, dst netip.Addr, n int) {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if dst.Is6() {
		proto = ipv6.ProtocolNumber
	}
	var ln net.Listener
	if err := pod.netns.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
		return err
	}); err != nil {
		t.Fatalf("pod listen: %v", err)
	}
	defer ln.Close()
	received := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(transferDeadline))
		received <- checkStream(c, n)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), transferDeadline)
	defer cancel()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	c, err := gonet.DialContextTCP(ctx, s, tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(dst), Port: port}, proto)
	if err != nil {
		t.Fatalf("gvisor dial: %v", err)
	}
	c.SetDeadline(time.Now().Add(transferDeadline))
	if err := sendStream(c, n); err != nil {
		t.Errorf("agent send: %v", err)
	}
	c.Close()
	if err := <-received; err != nil {
		t.Errorf("agent to pod: %v", err)
	}
}

// kernelSNMP reads counter name of group ("Tcp", "Ip") from the pod
// namespace's /proc/net/snmp.
func kernelSNMP(t *testing.T, netns ns.NetNS, group, name string) uint64 {
	t.Helper()
	var v uint64
	err := netns.Do(func(ns.NetNS) error {
		f, err := os.Open("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		defer f.Close()
		var names []string
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) == 0 || fields[0] != group+":" {
				continue
			}
			if names == nil {
				names = fields
				continue
			}
			for i, n := range names {
				if n == name && i < len(fields) {
					v, err = strconv.ParseUint(fields[i], 10, 64)
					return err
				}
			}
		}
		return fmt.Errorf("no %s %s in snmp", group, name)
	})
	if err != nil {
		t.Fatalf("read snmp: %v", err)
	}
	return v
}

// ping sends one ICMP echo request from the pod to dst over a raw socket
// and waits for the matching reply.
func ping(t *testing.T, pod *kernelPod, dst netip.Addr) {
	t.Helper()
	network, laddr := "ip4:icmp", "0.0.0.0"
	if dst.Is6() {
		network, laddr = "ip6:ipv6-icmp", "::"
	}
	var c net.PacketConn
	if err := pod.netns.Do(func(ns.NetNS) error {
		var err error
		c, err = net.ListenPacket(network, laddr)
		return err
	}); err != nil {
		t.Fatalf("raw icmp socket: %v", err)
	}
	defer c.Close()
	const ident, seq = 0x5a5a, 7
	payload := []byte("shm-cni tap ping")
	var req []byte
	if dst.Is4() {
		req = make([]byte, header.ICMPv4MinimumSize+len(payload))
		m := header.ICMPv4(req)
		m.SetType(header.ICMPv4Echo)
		m.SetIdent(ident)
		m.SetSequence(seq)
		copy(m.Payload(), payload)
		m.SetChecksum(^checksum.Checksum(req, 0))
	} else {
		// The kernel fills in ICMPv6 checksums on raw sockets.
		req = make([]byte, header.ICMPv6EchoMinimumSize+len(payload))
		m := header.ICMPv6(req)
		m.SetType(header.ICMPv6EchoRequest)
		m.SetIdent(ident)
		m.SetSequence(seq)
		copy(req[header.ICMPv6EchoMinimumSize:], payload)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.WriteTo(req, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		t.Fatalf("send echo request to %s: %v", dst, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatalf("no echo reply from %s: %v", dst, err)
		}
		m := buf[:n]
		if from.(*net.IPAddr).IP.Equal(dst.AsSlice()) && n == len(req) && bytes.Equal(m[len(m)-len(payload):], payload) {
			if dst.Is4() && header.ICMPv4(m).Type() == header.ICMPv4EchoReply && header.ICMPv4(m).Ident() == ident && header.ICMPv4(m).Sequence() == seq {
				return
			}
			if dst.Is6() && header.ICMPv6(m).Type() == header.ICMPv6EchoReply && header.ICMPv6(m).Ident() == ident && header.ICMPv6(m).Sequence() == seq {
				return
			}
		}
	}
}

// transferSize is what each TCP transfer carries; -short makes it small.
func transferSize() int {
	if testing.Short() {
		return 8 << 20
	}
	return 100 << 20
}

// TestTAPTraffic runs ping (IPv4, IPv6) and 100 MiB TCP transfers in both
// directions between a kernel pod on a TAP device and a gVisor stack on a
// Endpoint, with offload on (the kernel sends TCP super-packets the
// endpoint segments; the stack sends super-packets the kernel segments) and
// with no virtio-net header at all.
func TestTAPTraffic(t *testing.T) {
	testutil.RequireRoot(t)
	tests := []struct {
		name    string
		offload bool
	}{
		{name: "offload on", offload: true},
		{name: "offload off", offload: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pod := newKernelPod(t, "eth0", tuntap.Options{VnetHdr: tc.offload, Offload: tc.offload})
			opts := Options{
				FD:             rawFD(t, pod.file),
				MTU:            testMTU,
				EthernetHeader: true,
				LinkAddress:    agentMAC,
				VnetHdr:        tc.offload,
			}
			if tc.offload {
				opts.GSOMaxSize = 65535
			}
			ep, err := New(opts)
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			link := &checkedLink{Endpoint: ep}
			s := newAgentStack(t, link, true)

			ping(t, pod, agentAddr4)
			ping(t, pod, agentAddr6)

			n := transferSize()
			podToAgent(t, s, pod, agentAddr4, n)
			podToAgent(t, s, pod, agentAddr6, n)
			agentToPod(t, s, pod, podAddr4, n)
			agentToPod(t, s, pod, podAddr6, n)

			off, st := ep.OffloadStats(), ep.Stats().Snapshot()
			t.Logf("stats %+v; rx gso %d -> %d segments, csum completed %d, tx gso %d; checked %d segments",
				st, off.RxGSOPackets.Load(), off.RxGSOSegments.Load(), off.RxCsumCompleted.Load(), off.TxGSOPackets.Load(), link.checked.Load())
			if tc.offload {
				if off.RxGSOPackets.Load() == 0 || link.checked.Load() == 0 {
					t.Errorf("no TCP super-packet received from the kernel with offload on")
				}
				if off.TxGSOPackets.Load() == 0 {
					t.Errorf("no TCP super-packet handed to the kernel with offload on")
				}
			} else if off.RxGSOPackets.Load() != 0 || off.TxGSOPackets.Load() != 0 || off.RxCsumCompleted.Load() != 0 {
				t.Errorf("offload work without a virtio-net header")
			}
			if bad := link.bad.Load(); bad != 0 {
				t.Errorf("%d segments delivered as validated had bad checksums", bad)
			}
			if n := s.Stats().TCP.ChecksumErrors.Value(); n != 0 {
				t.Errorf("gvisor saw %d TCP checksum errors", n)
			}
			if n := kernelSNMP(t, pod.netns, "Tcp", "InCsumErrors"); n != 0 {
				t.Errorf("kernel saw %d TCP checksum errors", n)
			}
		})
	}
}

// TestTUNTraffic runs a 100 MiB TCP transfer each way over an L3 TUN device
// with offload on: no Ethernet header, no link resolution, super-packets in
// both directions.
func TestTUNTraffic(t *testing.T) {
	testutil.RequireRoot(t)
	pod := newKernelPod(t, "tun0", tuntap.Options{TUN: true, VnetHdr: true, Offload: true})
	ep, err := New(Options{FD: rawFD(t, pod.file), MTU: testMTU, VnetHdr: true, GSOMaxSize: 65535})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	link := &checkedLink{Endpoint: ep}
	s := newAgentStack(t, link, false)

	ping(t, pod, agentAddr4)
	podToAgent(t, s, pod, agentAddr4, transferSize())
	agentToPod(t, s, pod, podAddr4, transferSize())

	off := ep.OffloadStats()
	t.Logf("stats %+v; rx gso %d -> %d segments, tx gso %d", ep.Stats().Snapshot(),
		off.RxGSOPackets.Load(), off.RxGSOSegments.Load(), off.TxGSOPackets.Load())
	if off.RxGSOPackets.Load() == 0 || off.TxGSOPackets.Load() == 0 {
		t.Errorf("no TCP super-packets over the TUN device (rx %d, tx %d)", off.RxGSOPackets.Load(), off.TxGSOPackets.Load())
	}
	if bad := link.bad.Load(); bad != 0 {
		t.Errorf("%d segments delivered as validated had bad checksums", bad)
	}
	if n := s.Stats().TCP.ChecksumErrors.Value(); n != 0 {
		t.Errorf("gvisor saw %d TCP checksum errors", n)
	}
	if n := kernelSNMP(t, pod.netns, "Tcp", "InCsumErrors"); n != 0 {
		t.Errorf("kernel saw %d TCP checksum errors", n)
	}
}

// nopDispatcher drops what it is given.
type nopDispatcher struct{}

func (nopDispatcher) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
func (nopDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}

// closeRecorder records the calls of OnClosed.
type closeRecorder struct {
	calls atomic.Int32
	errs  chan error
}

func newCloseRecorder() *closeRecorder { return &closeRecorder{errs: make(chan error, 4)} }

func (r *closeRecorder) onClosed(err error) {
	r.calls.Add(1)
	r.errs <- err
}

// wait returns the first error passed to OnClosed.
func (r *closeRecorder) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.errs:
		return err
	case <-time.After(time.Minute):
		t.Fatal("OnClosed was not called")
		return nil
	}
}

// writeOne hands one small packet to WritePackets.
func writeOne(t *testing.T, ep *Endpoint) {
	t.Helper()
	pkt := stackTCPPacket(false, []byte("x"), 0, header.TCPFlagAck)
	defer pkt.DecRef()
	pkt.GSOOptions = stack.GSO{}
	ep.AddHeader(pkt)
	var pkts stack.PacketBufferList
	pkts.PushBack(pkt)
	if n, err := ep.WritePackets(pkts); n != 1 || err != nil {
		t.Errorf("WritePackets = %d, %v; want 1, nil", n, err)
	}
}

// TestTAPDeviceDeleted checks that deleting the device under a running
// endpoint calls OnClosed once, stops the endpoint and closes its fd, and
// that later writes are dropped and counted.
func TestTAPDeviceDeleted(t *testing.T) {
	testutil.RequireRoot(t)
	pod := newKernelPod(t, "eth0", tuntap.Options{VnetHdr: true, Offload: true, Persist: true})
	rec := newCloseRecorder()
	ep, err := New(Options{FD: rawFD(t, pod.file), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true, OnClosed: rec.onClosed})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ep.Attach(nopDispatcher{})
	if err := pod.netns.Do(func(ns.NetNS) error {
		link, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.LinkDel(link)
	}); err != nil {
		t.Fatalf("delete link: %v", err)
	}
	if err := rec.wait(t); !errors.Is(err, unix.EBADFD) {
		t.Errorf("OnClosed(%v), want EBADFD", err)
	}
	ep.Wait()
	drops := ep.Stats().TxDrops.Load()
	writeOne(t, ep)
	if got := ep.Stats().TxDrops.Load(); got != drops+1 {
		t.Errorf("TxDrops %d after a write to a gone device, want %d", got, drops+1)
	}
	ep.Close()
	ep.Close()
	ep.Wait()
	if got := rec.calls.Load(); got != 1 {
		t.Errorf("OnClosed called %d times, want 1", got)
	}
}

// TestTAPNetNSRemoved checks what happens when the pod's namespace is
// removed (unmounted, no process left) while the endpoint holds the fd: the
// fd keeps the namespace and the device alive, and tuntap.NetNS reaches the
// namespace to delete the device, which OnClosed then reports.
func TestTAPNetNSRemoved(t *testing.T) {
	testutil.RequireRoot(t)
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	var f *os.File
	err = netns.Do(func(ns.NetNS) error {
		var err error
		f, err = tuntap.Open("eth0", tuntap.Options{VnetHdr: true, Persist: true})
		return err
	})
	if err != nil {
		t.Fatalf("tuntap.Open: %v", err)
	}
	rec := newCloseRecorder()
	ep, err := New(Options{FD: rawFD(t, f), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true, OnClosed: rec.onClosed})
	f.Close()
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { ep.Close(); ep.Wait() })
	ep.Attach(nopDispatcher{})

	netns.Close()
	if err := testutils.UnmountNS(netns); err != nil {
		t.Fatal(err)
	}

	// The endpoint's fd still reaches the device, so the namespace lives.
	var nsFile *os.File
	ep.fdMu.RLock()
	if !ep.fdClosed {
		nsFile, err = tuntap.NetNS(ep.fd)
	}
	ep.fdMu.RUnlock()
	if nsFile == nil || err != nil {
		t.Fatalf("tuntap.NetNS after the namespace was unmounted: %v (endpoint fd closed: %t)", err, nsFile == nil)
	}
	defer nsFile.Close()
	orphan, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", rawFD(t, nsFile)))
	if err != nil {
		t.Fatal(err)
	}
	defer orphan.Close()
	if err := orphan.Do(func(ns.NetNS) error {
		link, err := netlink.LinkByName("eth0")
		if err != nil {
			return fmt.Errorf("device gone with the unmounted namespace: %w", err)
		}
		return netlink.LinkDel(link)
	}); err != nil {
		t.Fatal(err)
	}
	if err := rec.wait(t); !errors.Is(err, unix.EBADFD) {
		t.Errorf("OnClosed(%v), want EBADFD", err)
	}
	ep.Wait()
}

// TestNewTAPMismatch: New refuses an fd whose device does not match its
// options (a TAP without the virtio-net header given as one with it, and an
// Ethernet link given as plain IP).
func TestNewTAPMismatch(t *testing.T) {
	testutil.RequireRoot(t)
	netns := testutil.NewNS(t)
	err := netns.Do(func(ns.NetNS) error {
		f, err := tuntap.Open("ptap0", tuntap.Options{})
		if err != nil {
			return err
		}
		defer f.Close()
		for _, o := range []Options{
			{FD: rawFD(t, f), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true},
			{FD: rawFD(t, f), MTU: testMTU},
		} {
			if ep, err := New(o); err == nil {
				ep.Close()
				t.Errorf("New(%+v) accepted a mismatched device", o)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// resourceCounts returns the process's goroutines, open fds and threads.
func resourceCounts(t *testing.T) (goroutines, fds, threads int) {
	t.Helper()
	fdEntries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	return runtime.NumGoroutine(), len(fdEntries), len(tasks)
}

// TestTAPNoLeak runs 1000 New/Attach/Close/Wait cycles on one device and
// checks that no goroutine, fd or thread is left behind: the reader parks
// on the runtime poller instead of pinning a thread, and Close+Wait end it
// and close the endpoint's fd.
func TestTAPNoLeak(t *testing.T) {
	testutil.RequireRoot(t)
	pod := newKernelPod(t, "eth0", tuntap.Options{VnetHdr: true, Offload: true})
	fd := rawFD(t, pod.file)
	cycle := func() {
		ep, err := New(Options{FD: fd, MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		ep.Attach(nopDispatcher{})
		ep.Close()
		ep.Wait()
	}
	cycle() // warm up the runtime poller and pools
	g0, fd0, th0 := resourceCounts(t)
	for range 1000 {
		cycle()
	}
	// A goroutine that has called wg.Done may not have returned yet; give
	// the scheduler a chance before counting.
	for i := 0; i < 100 && runtime.NumGoroutine() > g0; i++ {
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
	g1, fd1, th1 := resourceCounts(t)
	t.Logf("goroutines %d -> %d, fds %d -> %d, threads %d -> %d", g0, g1, fd0, fd1, th0, th1)
	if g1 > g0 {
		t.Errorf("goroutines: %d before, %d after", g0, g1)
	}
	if fd1 != fd0 {
		t.Errorf("open fds: %d before, %d after", fd0, fd1)
	}
	// The runtime may start a thread or two of its own (GC, a blocking
	// syscall elsewhere); a thread per endpoint would show as ~1000.
	if th1 > th0+4 {
		t.Errorf("threads: %d before, %d after", th0, th1)
	}
}

// TestTAPDetachStopsReader checks that Attach(nil) stops the reader so that
// Wait returns before Close (the order of the stack's Wait and Destroy),
// that the fd stays usable for a new Attach, and that Close then closes it.
func TestTAPDetachStopsReader(t *testing.T) {
	testutil.RequireRoot(t)
	pod := newKernelPod(t, "eth0", tuntap.Options{})
	ep, err := New(Options{FD: rawFD(t, pod.file), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ep.Attach(nopDispatcher{})
	ep.Attach(nil)
	ep.Wait()
	if ep.IsAttached() {
		t.Errorf("attached after Attach(nil)")
	}
	ep.Attach(nopDispatcher{})
	ep.Attach(nil)
	ep.Wait()
	writeOne(t, ep)
	if got := ep.Stats().TxPackets.Load(); got != 1 {
		t.Errorf("TxPackets %d after a write on a detached endpoint, want 1", got)
	}
	ep.Close()
	ep.Wait()
	ep.fdMu.RLock()
	closed := ep.fdClosed
	ep.fdMu.RUnlock()
	if !closed {
		t.Errorf("fd open after Close and Wait")
	}
}

// capture opens an AF_PACKET socket on the pod's device that sees every
// frame the endpoint writes to it.
func capture(t *testing.T, pod *kernelPod) int {
	t.Helper()
	var fd int
	err := pod.netns.Do(func(ns.NetNS) error {
		link, err := netlink.LinkByName(pod.name)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: link.Attrs().Index})
	})
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	tv := unix.NsecToTimeval((30 * time.Second).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return fd
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestTAPWriteFrames checks that WritePackets puts exactly the packet's
// bytes on the device whether the packet is in a few pieces (written in
// place) or in more pieces than the endpoint keeps iovecs for (copied
// flat), and that the in-place write allocates nothing.
func TestTAPWriteFrames(t *testing.T) {
	testutil.RequireRoot(t)
	pod := newKernelPod(t, "eth0", tuntap.Options{VnetHdr: true, Offload: true})
	ep, err := New(Options{FD: rawFD(t, pod.file), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { ep.Close(); ep.Wait() })
	sock := capture(t, pod)

	// An EtherType from the local experimental range, so the pod's stack
	// ignores the frames.
	const etherType = 0x88b5
	build := func(pieces int) *stack.PacketBuffer {
		// 64-byte views fill their chunks, so the buffer keeps them apart.
		var payload buffer.Buffer
		for range pieces {
			payload.Append(buffer.NewViewWithData(frametest.RandomBytes(64)))
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: header.EthernetMinimumSize, Payload: payload})
		pkt.NetworkProtocolNumber = etherType
		pkt.EgressRoute.RemoteLinkAddress = header.EthernetBroadcastAddress
		ep.AddHeader(pkt)
		return pkt
	}
	tests := []struct {
		name          string
		pieces        int
		wantFlattened uint64
	}{
		{name: "in place", pieces: 3},
		{name: "flattened", pieces: txIovecs + 8, wantFlattened: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pkt := build(tc.pieces)
			defer pkt.DecRef()
			want := bytes.Join(pkt.AsSlices(), nil)
			flattened := ep.OffloadStats().TxFlattened.Load()
			var pkts stack.PacketBufferList
			pkts.PushBack(pkt)
			if n, err := ep.WritePackets(pkts); n != 1 || err != nil {
				t.Fatalf("WritePackets = %d, %v", n, err)
			}
			buf := make([]byte, 65536)
			for {
				n, err := unix.Read(sock, buf)
				if err != nil {
					t.Fatalf("capture: %v", err)
				}
				if n >= header.EthernetMinimumSize && header.Ethernet(buf).Type() == etherType {
					if !bytes.Equal(buf[:n], want) {
						t.Errorf("captured %d bytes that differ from the %d-byte packet", n, len(want))
					}
					break
				}
			}
			if got := ep.OffloadStats().TxFlattened.Load() - flattened; got != tc.wantFlattened {
				t.Errorf("TxFlattened grew by %d, want %d", got, tc.wantFlattened)
			}
		})
	}

	t.Run("no allocation", func(t *testing.T) {
		pkt := build(3)
		defer pkt.DecRef()
		var pkts stack.PacketBufferList
		pkts.PushBack(pkt)
		if allocs := testing.AllocsPerRun(100, func() { ep.WritePackets(pkts) }); allocs != 0 {
			t.Errorf("WritePackets allocates %.1f times per packet", allocs)
		}
	})
}

// TestTAPWriteToDownLink checks that writes the device refuses (the pod set
// its link down: EIO) are dropped and counted without an error reaching the
// stack, and that the endpoint carries on when the link comes back.
func TestTAPWriteToDownLink(t *testing.T) {
	testutil.RequireRoot(t)
	pod := newKernelPod(t, "eth0", tuntap.Options{VnetHdr: true, Offload: true})
	rec := newCloseRecorder()
	ep, err := New(Options{FD: rawFD(t, pod.file), MTU: testMTU, EthernetHeader: true, LinkAddress: agentMAC, VnetHdr: true, OnClosed: rec.onClosed})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { ep.Close(); ep.Wait() })
	ep.Attach(nopDispatcher{})
	setLink := func(up bool) {
		t.Helper()
		if err := pod.netns.Do(func(ns.NetNS) error {
			link, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			if up {
				return netlink.LinkSetUp(link)
			}
			return netlink.LinkSetDown(link)
		}); err != nil {
			t.Fatal(err)
		}
	}
	setLink(false)
	writeOne(t, ep)
	if st := ep.Stats().Snapshot(); st.TxDrops != 1 || st.TxPackets != 0 {
		t.Errorf("link down: TxDrops %d, TxPackets %d; want 1, 0", st.TxDrops, st.TxPackets)
	}
	setLink(true)
	writeOne(t, ep)
	if st := ep.Stats().Snapshot(); st.TxDrops != 1 || st.TxPackets != 1 {
		t.Errorf("link up again: TxDrops %d, TxPackets %d; want 1, 1", st.TxDrops, st.TxPackets)
	}
	if n := rec.calls.Load(); n != 0 {
		t.Errorf("OnClosed called %d times for a link that only went down", n)
	}
}
