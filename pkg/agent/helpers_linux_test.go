package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// Hang guards: they bound how long a broken test waits; no test passes or
// fails on how fast something happened.
const (
	callTimeout = time.Minute
	ioTimeout   = 2 * time.Minute
)

// The test topology: the node's pod CIDRs.
var (
	podCIDR4 = netip.MustParsePrefix("10.244.1.0/24")
	podCIDR6 = netip.MustParsePrefix("2001:db8:0:1::/64")
)

// shortTempDir is a temporary directory with a short path, so that the
// per-link sockets under it fit sun_path. Removed when t ends.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "shm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// env is a host namespace and a state directory agents run with.
type env struct {
	host ns.NetNS
	dir  string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.RequireRoot(t)
	return &env{host: testutil.NewNS(t), dir: shortTempDir(t)}
}

func (e *env) config() Config {
	cfg := DefaultConfig()
	cfg.PodCIDRs = []netip.Prefix{podCIDR4, podCIDR6}
	cfg.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("2001:db8::/48")}
	cfg.SocketPath = filepath.Join(e.dir, "agent.sock")
	cfg.StateDir = filepath.Join(e.dir, "state")
	cfg.SandboxDir = filepath.Join(e.dir, "sb")
	cfg.MetricsAddr = "127.0.0.1:0" // loopback of the test's own netns
	return cfg
}

// running is an agent Run by a test.
type running struct {
	*Agent
	cfg  Config
	stop func() error
}

// start creates an agent in e's host namespace and runs it until stop or
// the end of t, which fails on a Run error.
func (e *env) start(t *testing.T) *running {
	t.Helper()
	return e.startWith(t, e.config())
}

// startWith is start with cfg and options.
func (e *env) startWith(t *testing.T, cfg Config, opts ...Option) *running {
	t.Helper()
	var a *Agent
	testutil.Do(t, e.host, func() error {
		var err error
		a, err = New(cfg, testutil.Logger(t), opts...)
		return err
	})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.Run(ctx) }()
	stopped := false
	var runErr error
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			runErr = <-errc
		}
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("agent run: %v", err)
		}
	})
	select {
	case <-a.Ready():
	case err := <-errc:
		stopped = true
		cancel()
		t.Fatalf("agent run: %v", err)
	}
	return &running{Agent: a, cfg: cfg, stop: stop}
}

// call sends req to the agent.
func (r *running) call(t *testing.T, req *agentapi.Request, fds []int) (*agentapi.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return agentapi.Call(ctx, r.cfg.SocketPath, req, fds)
}

// mustCall is call failing t on error.
func (r *running) mustCall(t *testing.T, req *agentapi.Request, fds []int) *agentapi.Response {
	t.Helper()
	resp, err := r.call(t, req, fds)
	if err != nil {
		t.Fatalf("%s: %v", req.Op, err)
	}
	return resp
}

func (r *running) detach(t *testing.T, cid, ifName string) {
	t.Helper()
	r.mustCall(t, &agentapi.Request{Op: agentapi.OpDetach, Detach: &agentapi.DetachRequest{ContainerID: cid, IfName: ifName}}, nil)
}

// pod is a kernel-stack pod: a TAP eth0 in its own namespace.
type pod struct {
	ns    ns.NetNS
	cid   string
	addrs []netip.Addr
	resp  *agentapi.AttachResponse
}

// addr returns p's address of the family of v4.
func (p *pod) addr(v4 bool) netip.Addr {
	for _, a := range p.addrs {
		if a.Is4() == v4 {
			return a
		}
	}
	panic("no address of that family")
}

// tapOptions are the device options the tests create TAPs with, standing
// in for the CNI binary.
var tapOptions = tuntap.Options{VnetHdr: true, Offload: true, Persist: true}

// newTapPod creates a pod namespace with a persistent TAP eth0, attaches it
// (sending the pod MAC when sendMAC) and configures the namespace from the
// answer, as the CNI binary would; the test's own TAP fd is closed after
// the attach.
func (r *running) newTapPod(t *testing.T, cid string, sendMAC bool) *pod {
	t.Helper()
	return r.newTapPodAs(t, cid, "default", "pod-"+cid, sendMAC)
}

// newTapPodAs is newTapPod for the Kubernetes pod podNS/podName.
func (r *running) newTapPodAs(t *testing.T, cid, podNS, podName string, sendMAC bool) *pod {
	t.Helper()
	p := &pod{ns: testutil.NewNS(t), cid: cid}
	var f *os.File
	var mac net.HardwareAddr
	testutil.Do(t, p.ns, func() error {
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/accept_dad", []byte("0"), 0o644); err != nil {
			return err
		}
		var err error
		if f, err = tuntap.Open("eth0", tapOptions); err != nil {
			return err
		}
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		mac = l.Attrs().HardwareAddr
		return nil
	})
	req := &agentapi.AttachRequest{
		ContainerID: cid, IfName: "eth0", Netns: p.ns.Path(), Network: "shm-test", Kind: agentapi.KindTap,
		PodNamespace: podNS, PodName: podName,
	}
	if sendMAC {
		req.MAC = mac.String()
	}
	resp := r.mustCall(t, &agentapi.Request{Op: agentapi.OpAttach, Attach: req}, []int{fileFD(f)})
	f.Close()
	p.resp = resp.Attach
	for _, ip := range resp.Attach.IPs {
		pfx := netip.MustParsePrefix(ip.Address)
		p.addrs = append(p.addrs, pfx.Addr())
	}
	testutil.Do(t, p.ns, func() error { return configurePod(resp.Attach) })
	return p
}

// newVethPodAs creates a pod namespace whose eth0 is a veth pair's peer,
// the host side (linkspec.HostVethName) in host, attaches it as kind veth
// for the Kubernetes pod podNS/podName and configures the namespace from
// the answer, as the CNI binary would. It turns forwarding on in host (IPv4
// on the uplink alone).
func (r *running) newVethPodAs(t *testing.T, host ns.NetNS, cid, podNS, podName string) *pod {
	t.Helper()
	p := &pod{ns: testutil.NewNS(t), cid: cid}
	req := &agentapi.AttachRequest{
		ContainerID: cid, IfName: "eth0", Netns: p.ns.Path(), Network: "shm-test", Kind: agentapi.KindVeth,
		PodNamespace: podNS, PodName: podName,
	}
	testutil.Do(t, p.ns, func() error {
		return os.WriteFile("/proc/sys/net/ipv6/conf/default/accept_dad", []byte("0"), 0o644)
	})
	testutil.Do(t, host, func() error {
		// The host's kernel forwards a veth link's packets. IPv4 as
		// the runtime tiers leave it (the host's switch off, forwarding
		// on the uplink: the agent turns it on for each host side);
		// IPv6 has no switch per device.
		for _, f := range []string{"/proc/sys/net/ipv4/conf/" + r.cfg.Uplink + "/forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: linkspec.HostVethName(req.Key())},
			PeerName: "eth0", PeerNamespace: netlink.NsFd(int(p.ns.Fd()))})
	})
	testutil.Do(t, p.ns, func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		req.MAC = l.Attrs().HardwareAddr.String()
		return nil
	})
	resp := r.mustCall(t, &agentapi.Request{Op: agentapi.OpAttach, Attach: req}, nil)
	p.resp = resp.Attach
	for _, ip := range resp.Attach.IPs {
		p.addrs = append(p.addrs, netip.MustParsePrefix(ip.Address).Addr())
	}
	testutil.Do(t, p.ns, func() error { return configurePod(resp.Attach) })
	return p
}

// configurePod applies an attach answer to eth0 of the current namespace.
func configurePod(resp *agentapi.AttachResponse) error {
	l, err := netlink.LinkByName("eth0")
	if err != nil {
		return err
	}
	if err := netlink.LinkSetMTU(l, resp.MTU); err != nil {
		return err
	}
	for _, ip := range resp.IPs {
		pfx := netip.MustParsePrefix(ip.Address)
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: pfx.Addr().AsSlice(), Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen())}}
		if pfx.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add %s: %w", pfx, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return err
	}
	for _, rt := range resp.Routes {
		dst := netip.MustParsePrefix(rt.Dst)
		route := &netlink.Route{
			LinkIndex: l.Attrs().Index,
			Dst:       &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
			Gw:        netip.MustParseAddr(rt.GW).AsSlice(),
			Flags:     int(netlink.FLAG_ONLINK),
		}
		if err := netlink.RouteAdd(route); err != nil {
			return fmt.Errorf("route %s via %s: %w", rt.Dst, rt.GW, err)
		}
	}
	return nil
}

// attachShm attaches a shm link with a fresh default-size queue pair, as
// the CNI binary would, and returns the answer.
func (r *running) attachShm(t *testing.T, cid string) *agentapi.AttachResponse {
	t.Helper()
	resp, err := r.tryAttachShm(t, cid)
	if err != nil {
		t.Fatalf("attach shm %s: %v", cid, err)
	}
	return resp
}

func (r *running) tryAttachShm(t *testing.T, cid string) (*agentapi.AttachResponse, error) {
	return r.tryAttachShmWith(t, cid, queue.DefaultSizes(), 0)
}

// tryAttachShmWith attaches a shm link with a fresh queue pair of sizes sz,
// asking for MTU mtu (0: the agent's choice).
func (r *running) tryAttachShmWith(t *testing.T, cid string, sz queue.Sizes, mtu int) (*agentapi.AttachResponse, error) {
	return r.tryAttachShmAs(t, cid, "default", "sandbox-"+cid, sz, mtu)
}

// tryAttachShmAs is tryAttachShmWith for the Kubernetes pod podNS/podName.
func (r *running) tryAttachShmAs(t *testing.T, cid, podNS, podName string, sz queue.Sizes, mtu int) (*agentapi.AttachResponse, error) {
	pair, err := queue.NewPair(sz)
	if err != nil {
		return nil, err
	}
	defer pair.Close()
	resp, err := r.call(t, &agentapi.Request{Op: agentapi.OpAttach, Attach: &agentapi.AttachRequest{
		MTU: mtu,
		// The agent only checks that a shm pod's netns exists (its
		// sandbox lives there): any netns path does.
		ContainerID: cid, IfName: "eth0", Netns: "/proc/self/ns/net", Network: "shm-test", Kind: agentapi.KindShm,
		Queue:        &agentapi.QueueSizes{DataSize: sz.DataSize, PipeSize: sz.PipeSize, BufferSize: sz.BufferSize},
		PodNamespace: podNS, PodName: podName,
	}}, pair.FDs())
	if err != nil {
		return nil, err
	}
	return resp.Attach, nil
}

// sandbox is a sandbox's netstack on a dialled link.
type sandbox struct {
	s   *stack.Stack
	ep  *shm.Client
	cfg shm.LinkConfig
}

// dialSandbox dials socketPath and brings up a netstack on the link. close
// hangs up; it also runs when t ends.
func dialSandbox(t *testing.T, socketPath string) (*sandbox, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	ep, cfg, err := shm.Dial(ctx, socketPath, shm.DialOptions{Logger: testutil.Logger(t)})
	if err != nil {
		return nil, err
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	sb := &sandbox{s: s, ep: ep, cfg: cfg}
	if err := s.CreateNIC(1, ep); err != nil {
		ep.Close()
		ep.Wait()
		return nil, fmt.Errorf("create NIC: %s", err)
	}
	t.Cleanup(sb.close)
	if err := cfg.Configure(s, 1); err != nil {
		return nil, err
	}
	return sb, nil
}

// close removes the NIC (which closes the endpoint and hangs up) and waits.
// It is idempotent.
func (sb *sandbox) close() {
	sb.s.RemoveNIC(1)
	sb.ep.Wait()
	sb.s.Close()
	sb.s.Wait()
}

func (sb *sandbox) addr(v4 bool) netip.Addr {
	for _, p := range sb.cfg.Addresses {
		if p.Addr().Is4() == v4 {
			return p.Addr()
		}
	}
	panic("no address of that family")
}

// listen listens on a TCP port of addr inside the sandbox.
func (sb *sandbox) listen(t *testing.T, addr netip.Addr, port uint16) net.Listener {
	t.Helper()
	ln, err := gonet.ListenTCP(sb.s, tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(addr), Port: port}, tcpipx.ProtocolOf(addr))
	if err != nil {
		t.Fatalf("sandbox listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dial connects from the sandbox to dst.
func (sb *sandbox) dial(dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	return gonet.DialContextTCP(ctx, sb.s, tcpip.FullAddress{NIC: 1, Addr: tcpipx.Addr(dst.Addr()), Port: dst.Port()}, tcpipx.ProtocolOf(dst.Addr()))
}

// listenIn listens on a kernel TCP port of addr inside n.
func listenIn(t *testing.T, n ns.NetNS, addr netip.Addr) net.Listener {
	t.Helper()
	var ln net.Listener
	testutil.Do(t, n, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
		return err
	})
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialFrom connects from inside n (kernel stack) to dst.
func dialFrom(n ns.NetNS, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = (&net.Dialer{Timeout: ioTimeout}).Dial("tcp", dst.String())
		return err
	})
	return c, err
}

// patternByte is the verifiable stream of a transfer: lost, duplicated or
// reordered bytes show.
func patternByte(off int64) byte { return byte((uint64(off) * 0x9E3779B1) >> 24) }

// transfer sends n pattern bytes over a connection made by dial to ln and
// fails t unless the server got exactly them. It returns the client address
// the server saw.
func transfer(t *testing.T, ln net.Listener, dial func() (net.Conn, error), n int64) netip.Addr {
	t.Helper()
	type result struct {
		remote netip.Addr
		got    int64
		err    error
	}
	res := make(chan result, 1)
	go func() {
		var r result
		defer func() { res <- r }()
		c, err := ln.Accept()
		if err != nil {
			r.err = err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(ioTimeout))
		r.remote = netip.MustParseAddrPort(c.RemoteAddr().String()).Addr().Unmap()
		buf := make([]byte, 64<<10)
		for {
			k, err := c.Read(buf)
			for i := range k {
				if buf[i] != patternByte(r.got) {
					r.err = fmt.Errorf("byte %d: got %#x, want %#x", r.got, buf[i], patternByte(r.got))
					return
				}
				r.got++
			}
			if errors.Is(err, io.EOF) {
				return
			}
			if err != nil {
				r.err = err
				return
			}
		}
	}()
	c, err := dial()
	if err != nil {
		t.Fatalf("connect to %s: %v", ln.Addr(), err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioTimeout))
	buf := make([]byte, 64<<10)
	for off := int64(0); off < n; {
		k := min(int64(len(buf)), n-off)
		for i := range k {
			buf[i] = patternByte(off + i)
		}
		if _, err := c.Write(buf[:k]); err != nil {
			t.Fatalf("send to %s at %d: %v", ln.Addr(), off, err)
		}
		off += k
	}
	type closeWriter interface{ CloseWrite() error }
	if err := c.(closeWriter).CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	r := <-res
	if r.err != nil || r.got != n {
		t.Fatalf("server at %s got %d verified bytes of %d: %v", ln.Addr(), r.got, n, r.err)
	}
	return r.remote
}

// tunFDs counts this process's descriptors open on /dev/net/tun.
func tunFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && l == "/dev/net/tun" {
			n++
		}
	}
	return n
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func unixUnmount(path string) error { return unix.Unmount(path, unix.MNT_DETACH) }

// openTestTAP creates a non-persistent TAP device in the current netns: it
// goes away with the last fd.
func openTestTAP(name string) (*os.File, error) {
	return tuntap.Open(name, tuntap.Options{VnetHdr: true, Offload: true})
}
