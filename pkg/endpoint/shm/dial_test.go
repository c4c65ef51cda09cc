package shm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/shm-cni/shm-cni/internal/unixmsg"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// dialPort is the agent netstack's TCP port in TestDialTCP.
const dialPort = 7001

// dialTestConfig is a valid dual-stack link config.
func dialTestConfig() LinkConfig {
	return LinkConfig{
		Version:    LinkConfigVersion,
		MAC:        "02:53:0a:f4:01:05",
		GatewayMAC: "ee:ee:ee:ee:ee:ee",
		MTU:        1500,
		BufferSize: queue.DefaultBufferSize,
		Addresses:  []netip.Prefix{netip.MustParsePrefix("10.244.1.5/32"), netip.MustParsePrefix("2001:db8:0:1::5/128")},
		Routes: []LinkRoute{
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), GW: netip.MustParseAddr("169.254.1.1")},
			{Dst: netip.MustParsePrefix("::/0"), GW: netip.MustParseAddr("fe80::1")},
		},
		Gateways: []netip.Addr{netip.MustParseAddr("169.254.1.1"), netip.MustParseAddr("fe80::1")},
	}
}

// dialParseCases are ParseLinkConfig's table, also the fuzz seeds.
var dialParseCases = []struct {
	name string
	in   string
	// want is a substring of the error, "" for success.
	want string
}{
	{"valid", `{"version":1,"mac":"02:53:0a:f4:01:05","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048,` +
		`"addresses":["10.244.1.5/32","2001:db8:0:1::5/128"],"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"},{"dst":"::/0","gw":"fe80::1"}],` +
		`"gateways":["169.254.1.1","fe80::1"]}`, ""},
	{"unknown field ignored", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048,` +
		`"addresses":["10.0.0.1/32"],"future":true}`, ""},
	{"on-link route", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048,` +
		`"addresses":["10.0.0.1/24"],"routes":[{"dst":"10.0.0.0/24"}]}`, ""},
	{"refused", `{"version":1,"error":"another sandbox holds this link"}`, "another sandbox holds this link"},
	{"other version", `{"version":2,"mac":"02:00:00:00:00:01"}`, "version 2"},
	{"not json", `hello`, "invalid character"},
	{"empty", ``, "EOF"},
	{"trailing data", `{"version":1,"error":"x"} {}`, "data after"},
	{"bad macs", `{"version":1,"mac":"01:00:00:00:00:01","gatewayMac":"00:00:00:00:00:00","mtu":1500,"bufferSize":2048,"addresses":["10.0.0.1/32"]}`, "multicast"},
	{"bad mtu and buffer", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":10,"bufferSize":1,"addresses":["10.0.0.1/32"]}`, "mtu: 10"},
	{"no address", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048}`, "addresses: none"},
	{"bad address", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048,"addresses":["10.0.0.1"]}`, "ParsePrefix"},
	{"route family mismatch", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048,` +
		`"addresses":["10.0.0.1/32"],"routes":[{"dst":"0.0.0.0/0","gw":"fe80::1"}]}`, "not of the family"},
	{"unmasked route", `{"version":1,"mac":"02:00:00:00:00:01","gatewayMac":"ee:ee:ee:ee:ee:ee","mtu":1500,"bufferSize":2048,` +
		`"addresses":["10.0.0.1/32"],"routes":[{"dst":"10.0.0.1/8"}]}`, "not a masked prefix"},
	{"too large", `{"version":1,"error":"` + strings.Repeat("x", MaxLinkConfigSize) + `"}`, "more than"},
}

// TestParseLinkConfig checks acceptance and the error of each bad record.
func TestParseLinkConfig(t *testing.T) {
	for _, tc := range dialParseCases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseLinkConfig([]byte(tc.in))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("got error %v, want success", err)
			case tc.want != "" && err == nil:
				t.Fatalf("got success, want an error with %q", tc.want)
			case tc.want != "" && !strings.Contains(err.Error(), tc.want):
				t.Fatalf("got error %v, want one with %q", err, tc.want)
			}
		})
	}
}

// TestLinkConfigRoundTrip checks that what SendLinkConfig marshals parses
// back to the same config.
func TestLinkConfigRoundTrip(t *testing.T) {
	want := dialTestConfig()
	a, b := dialSocketPair(t)
	pair := dialNewPair(t)
	if err := SendLinkConfig(a, want, pair); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, MaxLinkConfigSize)
	n, fds, err := recvLinkRecord(b, buf)
	if err != nil {
		t.Fatal(err)
	}
	unixmsg.Close(fds)
	if len(fds) != queue.FDsPerPair {
		t.Errorf("got %d descriptors, want %d", len(fds), queue.FDsPerPair)
	}
	got, err := ParseLinkConfig(buf[:n])
	if err != nil {
		t.Fatal(err)
	}
	gb, _ := jsonString(got)
	wb, _ := jsonString(want)
	if gb != wb {
		t.Errorf("got %s, want %s", gb, wb)
	}
}

// FuzzParseLinkConfig: no input crashes the parser, and an accepted config
// validates.
func FuzzParseLinkConfig(f *testing.F) {
	for _, tc := range dialParseCases {
		f.Add([]byte(tc.in))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseLinkConfig(b)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("accepted config does not validate: %v", err)
		}
	})
}

// TestDialTCP dials a fake agent, runs a netstack on the returned client
// configured from the link config, and carries verified TCP both ways to
// the agent's netstack on the server endpoint; then the agent hangs up and
// the client reports ErrPeerClosed.
func TestDialTCP(t *testing.T) {
	cfg := dialTestConfig()
	path, accepted := dialFakeAgent(t, func(conn *net.UnixConn) queue.Pair {
		pair := dialNewPair(t)
		if err := SendLinkConfig(conn, cfg, pair); err != nil {
			t.Error(err)
		}
		return pair
	})
	closed := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, got, err := Dial(ctx, path, DialOptions{OnClosed: func(err error) { closed <- err }})
	if err != nil {
		t.Fatal(err)
	}
	agentConn := <-accepted
	if got.MAC != cfg.MAC || got.MTU != cfg.MTU || len(got.Addresses) != 2 {
		t.Errorf("got config %+v, want %+v", got, cfg)
	}
	if client.LinkAddress() != tcpip.LinkAddress([]byte{0x02, 0x53, 0x0a, 0xf4, 0x01, 0x05}) {
		t.Errorf("client link address %v, want %s", client.LinkAddress(), cfg.MAC)
	}

	// The sandbox's netstack.
	sb := dialTestStack(t)
	if err := sb.CreateNIC(1, client); err != nil {
		t.Fatalf("CreateNIC: %s", err)
	}
	if err := got.Configure(sb, 1); err != nil {
		t.Fatal(err)
	}
	// The agent's side: the gateway address on a server endpoint.
	srvPair := agentConn.pair
	gwMAC, _ := net.ParseMAC(cfg.GatewayMAC)
	srv, err := NewServer(Options{Pair: srvPair, MTU: cfg.MTU, LinkAddress: tcpip.LinkAddress(gwMAC), PeerFD: agentConn.fd()})
	if err != nil {
		t.Fatal(err)
	}
	ag := dialTestStack(t)
	if err := ag.CreateNIC(1, srv); err != nil {
		t.Fatalf("CreateNIC: %s", err)
	}
	gw := tcpip.AddrFrom4([4]byte{169, 254, 1, 1})
	pod := tcpip.AddrFrom4([4]byte{10, 244, 1, 5})
	ag.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: gw.WithPrefix()}, stack.AddressProperties{})
	ag.AddStaticNeighbor(1, ipv4.ProtocolNumber, pod, client.LinkAddress())
	ag.AddRoute(tcpip.Route{Destination: pod.WithPrefix().Subnet(), NIC: 1})

	ln, err := gonet.ListenTCP(ag, tcpip.FullAddress{NIC: 1, Addr: gw, Port: dialPort}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		defer c.Close()
		if ra := c.RemoteAddr().(*net.TCPAddr).IP.String(); ra != "10.244.1.5" {
			srvErr <- errors.New("peer address " + ra + ", want the sandbox's 10.244.1.5")
			return
		}
		srvErr <- dialExchange(c, 4<<20, 2, 1)
	}()
	c, err := gonet.DialContextTCP(ctx, sb, tcpip.FullAddress{NIC: 1, Addr: gw, Port: dialPort}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatalf("dial the agent's netstack from the sandbox: %v", err)
	}
	if err := dialExchange(c, 4<<20, 1, 2); err != nil {
		t.Fatalf("sandbox: %v", err)
	}
	c.Close()
	if err := <-srvErr; err != nil {
		t.Fatalf("agent: %v", err)
	}

	// The agent hangs up: its endpoint and connection go.
	ag.RemoveNIC(1)
	srv.Wait()
	agentConn.conn.Close()
	if err := <-closed; !errors.Is(err, ErrPeerClosed) {
		t.Errorf("client OnClosed(%v), want ErrPeerClosed", err)
	}
	sb.RemoveNIC(1)
	client.Wait()
}

// TestDialRefused: a refusal surfaces as ErrDialRefused with its reason.
func TestDialRefused(t *testing.T) {
	path, _ := dialFakeAgent(t, func(conn *net.UnixConn) queue.Pair {
		if err := SendDialError(conn, "another sandbox holds this link"); err != nil {
			t.Error(err)
		}
		return queue.Pair{}
	})
	_, _, err := Dial(context.Background(), path, DialOptions{})
	if !errors.Is(err, ErrDialRefused) || !strings.Contains(err.Error(), "another sandbox") {
		t.Fatalf("got %v, want ErrDialRefused with the reason", err)
	}
}

// TestDialBadRecords: wrong descriptor counts, a closed connection and a
// config the client cannot use fail Dial and leave no descriptor open.
func TestDialBadRecords(t *testing.T) {
	cfg, _ := jsonString(dialTestConfig())
	devNulls := func(t *testing.T, n int) []int {
		var fds []int
		for range n {
			f, err := os.Open(os.DevNull)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			fds = append(fds, int(f.Fd()))
		}
		return fds
	}
	for _, tc := range []struct {
		name string
		// fds makes the descriptors to send (before counting).
		fds  func(t *testing.T) []int
		data string
		want string
	}{
		{"three fds", func(t *testing.T) []int { return dialNewPair(t).FDs()[:3] }, cfg, "got 3 descriptors"},
		{"eleven fds", func(t *testing.T) []int { return append(dialNewPair(t).FDs(), devNulls(t, 1)...) }, cfg, "got 11 descriptors"},
		{"sixteen fds", func(t *testing.T) []int { return append(dialNewPair(t).FDs(), devNulls(t, 6)...) }, cfg, "truncated"},
		{"config without fds", func(t *testing.T) []int { return nil }, cfg, "want 10"},
		{"hang up", func(t *testing.T) []int { return nil }, "", "without a link config"},
		{"fds are not queues", func(t *testing.T) []int { return devNulls(t, queue.FDsPerPair) }, cfg, "shared-memory client"},
		{"bad config with fds", func(t *testing.T) []int { return dialNewPair(t).FDs() }, `{"version":1}`, "mac"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fds := tc.fds(t)
			path, accepted := dialFakeAgent(t, func(conn *net.UnixConn) queue.Pair {
				if tc.data != "" {
					var oob []byte
					if len(fds) > 0 {
						oob = unix.UnixRights(fds...)
					}
					if _, _, err := conn.WriteMsgUnix([]byte(tc.data), oob, nil); err != nil {
						t.Error(err)
					}
				}
				conn.Close()
				return queue.Pair{}
			})
			before := dialOpenFDs(t)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // hang guard
			defer cancel()
			_, _, err := Dial(ctx, path, DialOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			<-accepted // the fake agent closed its connection
			if after := dialOpenFDs(t); after != before {
				t.Errorf("%d descriptors open after the failed Dial, %d before", after, before)
			}
		})
	}
}

// TestDialContext: a fake agent that never answers; ctx ends Dial.
func TestDialContext(t *testing.T) {
	block := make(chan struct{})
	path, _ := dialFakeAgent(t, func(conn *net.UnixConn) queue.Pair {
		<-block
		return queue.Pair{}
	})
	t.Cleanup(func() { close(block) })
	ctx, cancel := context.WithCancel(context.Background())
	go cancel()
	_, _, err := Dial(ctx, path, DialOptions{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled in the chain", err)
	}
}

// agentSide is the fake agent's end of one Dial.
type agentSide struct {
	conn *net.UnixConn
	pair queue.Pair
}

func (a agentSide) fd() int {
	var fd int
	rc, _ := a.conn.SyscallConn()
	rc.Control(func(u uintptr) { fd = int(u) })
	return fd
}

// dialFakeAgent listens on a fresh socket and runs serve for each
// connection; the connection and the pair serve returned are then sent on
// the returned channel. Everything is closed when t ends.
func dialFakeAgent(t *testing.T, serve func(*net.UnixConn) queue.Pair) (string, <-chan agentSide) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "link.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan agentSide, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			out <- agentSide{conn: conn, pair: serve(conn)}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(out)
		for a := range out {
			a.conn.Close()
		}
	})
	return path, out
}

// dialNewPair makes a default-size queue pair, closed when t ends.
func dialNewPair(t *testing.T) queue.Pair {
	t.Helper()
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Error(err)
		return queue.Pair{}
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// dialSocketPair returns two connected SOCK_SEQPACKET sockets.
func dialSocketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "seqpacket")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// dialTestStack is a sandbox-like netstack, closed when t ends. Its NICs go
// first: Stack.Wait holds the stack's lock while it waits for link
// endpoints, and a link delivering a packet may need that lock.
func dialTestStack(t *testing.T) *stack.Stack {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	t.Cleanup(func() {
		for id := range s.NICInfo() {
			s.RemoveNIC(id)
		}
		s.Close()
		s.Wait()
	})
	return s
}

// dialOpenFDs counts this process's open descriptors.
func dialOpenFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func jsonString(c LinkConfig) (string, error) {
	b, err := json.Marshal(c)
	return string(b), err
}

// dialPattern is the verifiable stream of a transfer of seed.
func dialPattern(off int64, seed byte) byte { return byte((uint64(off)*0x9E3779B1)>>24) ^ seed }

// dialExchange sends n pattern bytes of sendSeed on c while checking n
// bytes of recvSeed from it.
func dialExchange(c net.Conn, n int64, sendSeed, recvSeed byte) error {
	errc := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for off := int64(0); off < n; {
			k := min(int64(len(buf)), n-off)
			for i := range k {
				buf[i] = dialPattern(off+i, sendSeed)
			}
			if _, err := c.Write(buf[:k]); err != nil {
				errc <- err
				return
			}
			off += k
		}
		errc <- nil
	}()
	buf := make([]byte, 64<<10)
	var rerr error
	for off := int64(0); off < n && rerr == nil; {
		k, err := c.Read(buf[:min(int64(len(buf)), n-off)])
		for i := range k {
			if buf[i] != dialPattern(off, recvSeed) {
				return fmt.Errorf("byte %d: got %#x, want %#x", off, buf[i], dialPattern(off, recvSeed))
			}
			off++
		}
		if err != nil && off < n {
			rerr = fmt.Errorf("read at %d of %d: %w", off, n, err)
		}
	}
	if werr := <-errc; werr != nil {
		return fmt.Errorf("write: %w", werr)
	}
	return rerr
}
