// Command sandbox is the end-to-end tests' sandbox workload: a userspace
// gVisor netstack on a shm-cni sandbox link. It dials its link's socket
// (the socketPath of the CNI result), configures its netstack from the link
// config and then serves or acts as a client:
//
//	sandbox --socket S --mode echo --port 7000      TCP echo
//	sandbox --socket S --mode sink --port 7000      TCP: read, verify the pattern, report
//	sandbox ... --verify=false                       sink: count only; send: zeros (benchmarks)
//	sandbox --socket S --mode http --port 8080      a tiny HTTP server
//	sandbox --socket S --mode send --to A:P --bytes N   send N pattern bytes
//	sandbox ... --mode send --duration D              send for D instead (benchmarks)
//	sandbox --socket S --mode connect --to A:P      one TCP connection, then exit
//	sandbox --socket S --mode rtt --to A:P          64 B round trips to an echo
//	                                                 server: per count N read
//	                                                 on stdin, N of them
//	sandbox --packet eth0 [--packet-gso] --mode ...  the same netstack on a kernel
//	                                                 interface through AF_PACKET
//	                                                 (the benchmark's reference)
//
// Servers print "ready" on stdout once they listen and run until SIGTERM or
// SIGINT. A sender prints "sent ..." once the receiver closed, then its
// netstack's TCP counters and its link's drops ("tcp: segments N, acks N,
// retransmits N, recoveries N, spurious N, timeouts N, link drops N"). The pattern byte at offset i is byte((i * 0x9E3779B1) >> 24).
//
// The rtt mode is the benchmark's netstack client: it connects, prints
// "ready", then reads counts from stdin, one a line. For each count N it
// makes pattern.RoundTrips's warm-up and N timed 64 B round trips on its
// connection and prints their times on one line ("rtt: NS,NS,..."). It
// exits when stdin ends.
//
// With SHM_SANDBOX_CPUPROFILE=DIR in its environment (which the tests and
// the benchmark pass on to it), the program writes a CPU profile of its
// whole run to DIR/sandbox-MODE-PID.pprof, for go tool pprof.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/shm-cni/shm-cni/internal/hoptrace"
	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/test/e2e/packetlink"
	"github.com/shm-cni/shm-cni/test/e2e/pattern"
)

const nicID = 1

func main() { os.Exit(run()) }

func run() int {
	socket := flag.String("socket", "", "the link's socket (socketPath of the CNI result)")
	mode := flag.String("mode", "echo", "echo, sink, http, send, connect or rtt")
	port := flag.Int("port", 7000, "port to serve on")
	to := flag.String("to", "", "address:port to connect to (send, connect, rtt)")
	n := flag.Int64("bytes", 1<<20, "bytes to send (send)")
	dur := flag.Duration("duration", 0, "send: send for this long instead of --bytes (a benchmark's timed transfer); 0: --bytes")
	timeout := flag.Duration("timeout", 2*time.Minute, "bound of dialing the link and of client modes")
	verify := flag.Bool("verify", true, "sink: check every byte against the pattern (false: count only); send: send the pattern (false: zeros). Benchmarks measure the path with false; tests verify")
	packet := flag.String("packet", "", "instead of --socket: run on this kernel interface of the current network namespace through an AF_PACKET socket, as runsc's network=sandbox does (the benchmark's reference for a sandbox without shm-cni); the interface's addresses are the netstack's until the program exits")
	packetGSO := flag.Bool("packet-gso", false, "with --packet: virtio-net headers, and TCP segments as large as the device takes (runsc's host GSO)")
	flag.Parse()
	if (*socket == "") == (*packet == "") {
		fmt.Fprintln(os.Stderr, "sandbox: one of --socket and --packet is required")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	var (
		s   *stack.Stack
		ep  stack.LinkEndpoint
		cfg shm.LinkConfig
		err error
	)
	if *socket != "" {
		s, ep, cfg, err = up(ctx, *socket, *timeout)
	} else {
		s = newStack()
		var l *packetlink.Link
		if l, err = packetlink.Attach(s, nicID, *packet, *packetGSO, func(err error) { fmt.Fprintln(os.Stderr, "sandbox: link closed:", err) }); err != nil {
			s.Close()
		} else {
			ep, cfg = l.Endpoint, l.Config
			// After the NIC went (the deferred removal below runs first).
			defer func() {
				if err := l.Restore(); err != nil {
					fmt.Fprintln(os.Stderr, "sandbox: give the kernel its addresses back:", err)
				}
			}()
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox:", err)
		return 1
	}
	defer func() {
		s.RemoveNIC(nicID)
		ep.Wait()
		s.Close()
		s.Wait()
	}()
	fmt.Fprintf(os.Stderr, "sandbox: link up: mac %s, addresses %v, mtu %d\n", cfg.MAC, cfg.Addresses, cfg.MTU)
	// Stopped before the link's teardown, which may not end well.
	if dir := os.Getenv("SHM_SANDBOX_CPUPROFILE"); dir != "" {
		stopProfile, err := startCPUProfile(filepath.Join(dir, fmt.Sprintf("sandbox-%s-%d.pprof", *mode, os.Getpid())))
		if err != nil {
			fmt.Fprintln(os.Stderr, "sandbox:", err)
			return 1
		}
		defer stopProfile()
	}

	switch *mode {
	case "echo", "sink", "http":
		err = serve(ctx, s, cfg, *mode, uint16(*port), *verify)
	case "send", "connect":
		cctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		err = client(cctx, s, ep, *mode, *to, *n, *dur, *verify)
	case "rtt":
		err = rtt(ctx, s, *to, *timeout)
	default:
		err = fmt.Errorf("unknown mode %q", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox:", err)
		return 1
	}
	return 0
}

// startCPUProfile profiles the program's CPU into path until the returned
// function runs.
func startCPUProfile(path string) (func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "sandbox: cpu profile:", err)
		}
	}, nil
}

// newStack returns the sandbox's netstack, without NIC.
func newStack() *stack.Stack {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	// SACK recovers a burst lost to a full queue without a timeout.
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	return s
}

// up dials the link and brings up a netstack on it.
func up(ctx context.Context, socket string, timeout time.Duration) (*stack.Stack, stack.LinkEndpoint, shm.LinkConfig, error) {
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ep, cfg, err := shm.Dial(dctx, socket, shm.DialOptions{
		OnClosed: func(err error) { fmt.Fprintln(os.Stderr, "sandbox: link closed:", err) },
	})
	if err != nil {
		return nil, nil, cfg, err
	}
	s := newStack()
	if err := s.CreateNIC(nicID, ep); err != nil {
		ep.Close()
		ep.Wait()
		return nil, nil, cfg, fmt.Errorf("create NIC: %s", err)
	}
	if err := cfg.Configure(s, nicID); err != nil {
		s.RemoveNIC(nicID)
		ep.Wait()
		return nil, nil, cfg, err
	}
	return s, ep, cfg, nil
}

// serve listens on port for every address family of the link and serves
// mode until ctx ends.
func serve(ctx context.Context, s *stack.Stack, cfg shm.LinkConfig, mode string, port uint16, verify bool) error {
	var lns []net.Listener
	seen := map[bool]bool{}
	for _, p := range cfg.Addresses {
		v4 := p.Addr().Is4()
		if seen[v4] {
			continue
		}
		seen[v4] = true
		proto := ipv6.ProtocolNumber
		if v4 {
			proto = ipv4.ProtocolNumber
		}
		ln, err := gonet.ListenTCP(s, tcpip.FullAddress{NIC: nicID, Addr: tcpipx.Addr(p.Addr()), Port: port}, proto)
		if err != nil {
			return fmt.Errorf("listen on %s port %d: %w", p.Addr(), port, err)
		}
		defer ln.Close()
		lns = append(lns, ln)
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- serveListener(ln, mode, verify) }()
	}
	fmt.Println("ready")
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}

func serveListener(ln net.Listener, mode string, verify bool) error {
	if mode == "http" {
		return http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello from sandbox %s to %s\n", r.Host, r.RemoteAddr)
		}))
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer c.Close()
			if mode == "echo" {
				io.Copy(markedWriter{c}, markedReader{c})
				return
			}
			start := time.Now()
			read, status := pattern.Check, "verified"
			if !verify {
				read, status = pattern.Count, "counted"
			}
			got, err := read(c)
			d := time.Since(start)
			if err != nil {
				status = "BAD: " + err.Error()
			}
			fmt.Printf("sink: %d bytes from %s in %v (%.1f Mbit/s) %s\n",
				got, c.RemoteAddr(), d.Round(time.Millisecond), float64(got)*8/d.Seconds()/1e6, status)
		}()
	}
}

// dial connects to the address:port to.
func dial(ctx context.Context, s *stack.Stack, to string) (*gonet.TCPConn, error) {
	ap, err := netip.ParseAddrPort(to)
	if err != nil {
		return nil, fmt.Errorf("--to: %w", err)
	}
	proto := ipv6.ProtocolNumber
	if ap.Addr().Is4() {
		proto = ipv4.ProtocolNumber
	}
	c, err := gonet.DialContextTCP(ctx, s, tcpip.FullAddress{NIC: nicID, Addr: tcpipx.Addr(ap.Addr()), Port: ap.Port()}, proto)
	if err != nil {
		return nil, fmt.Errorf("connect %s: %w", to, err)
	}
	return c, nil
}

// rtt runs the rtt mode: round trips to the echo server at to, as many as
// each line of stdin asks for, each batch bounded by timeout.
func rtt(ctx context.Context, s *stack.Stack, to string, timeout time.Duration) error {
	dctx, cancel := context.WithTimeout(ctx, timeout)
	c, err := dial(dctx, s, to)
	cancel()
	if err != nil {
		return err
	}
	defer c.Close()
	// Stdin is read aside, so that a signal ends the program while it
	// waits for a line.
	lines := make(chan string)
	errc := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-ctx.Done():
				return
			}
		}
		errc <- sc.Err()
	}()
	fmt.Println("ready")
	for {
		var l string
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			if err != nil {
				return fmt.Errorf("stdin: %w", err)
			}
			return nil
		case l = <-lines:
		}
		count, err := strconv.Atoi(strings.TrimSpace(l))
		if err != nil || count <= 0 {
			return fmt.Errorf("stdin: %q is not a positive count of round trips", l)
		}
		rctx, cancel := context.WithTimeout(ctx, timeout)
		ds, err := pattern.RoundTrips(rctx, c, count)
		cancel()
		if err != nil {
			return err
		}
		fmt.Println(pattern.FormatRoundTrips(ds))
	}
}

// client runs the send or connect mode.
func client(ctx context.Context, s *stack.Stack, ep stack.LinkEndpoint, mode, to string, n int64, dur time.Duration, verify bool) error {
	c, err := dial(ctx, s, to)
	if err != nil {
		return err
	}
	defer c.Close()
	if mode == "connect" {
		fmt.Println("connected", c.LocalAddr(), "->", c.RemoteAddr())
		return nil
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	start := time.Now()
	if dur > 0 {
		if n, err = pattern.SendFor(c, dur, !verify); err != nil {
			return err
		}
	} else {
		send := pattern.Send
		if !verify {
			send = pattern.SendZeros
		}
		if err := send(c, n); err != nil {
			return err
		}
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	// Wait for the peer to close: everything was received.
	if _, err := io.Copy(io.Discard, c); err != nil {
		return fmt.Errorf("wait for the peer: %w", err)
	}
	d := time.Since(start)
	fmt.Printf("sent %d bytes to %s in %v (%.1f Mbit/s)\n", n, to, d.Round(time.Millisecond), float64(n)*8/d.Seconds()/1e6)
	// How the sender's TCP fared (a loss recovery cuts its congestion
	// window), and the frames its link dropped for want of room in the
	// ring (losses the link caused).
	t := s.Stats().TCP
	var linkDrops uint64
	if st, ok := ep.(interface{ Stats() *endpoint.Stats }); ok {
		linkDrops = st.Stats().TxDrops.Load()
	}
	fmt.Printf("tcp: segments %d, acks %d, retransmits %d, recoveries %d, spurious %d, timeouts %d, link drops %d\n",
		t.SegmentsSent.Value(), t.ValidSegmentsReceived.Value(), t.Retransmits.Value(),
		t.FastRecovery.Value()+t.SACKRecovery.Value(), t.SpuriousRecovery.Value(), t.Timeouts.Value(), linkDrops)
	return nil
}

// markedWriter marks each write for the benchmark's round-trip trace
// (hoptrace; nothing unless traced).
type markedWriter struct{ io.Writer }

func (w markedWriter) Write(b []byte) (int, error) {
	hoptrace.Mark(hoptrace.App)
	return w.Writer.Write(b)
}

// markedReader marks each read's return for the same trace.
type markedReader struct{ io.Reader }

func (r markedReader) Read(b []byte) (int, error) {
	n, err := r.Reader.Read(b)
	hoptrace.Mark(hoptrace.Read)
	return n, err
}
