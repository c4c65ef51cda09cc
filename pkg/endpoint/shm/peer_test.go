package shm

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/link/sharedmem"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/queue"
)

// The two-process tests run the server side in the test process and the
// client side (the "sandbox") in a child: the test binary run again with
// peerEnv set. The queue pair's descriptors cross a unix socket with
// SCM_RIGHTS, as they do between the agent and a sandbox; the same socket is
// each side's PeerFD.

const peerEnv = "SHM_CNI_TEST_PEER"

// Implementations of either side.
const (
	ours   = "ours"
	gvisor = "gvisor"
)

// Child modes.
const (
	modeExchange = "exchange" // n verified bytes each way
	modeEcho     = "echo"     // echo everything back until EOF
	modeSink     = "sink"     // read and drop until EOF
	modeSource   = "source"   // write n bytes, then close
)

// peerConfig is what the parent tells the child, through its environment.
type peerConfig struct {
	Impl       string // client implementation: ours or gvisor
	Mode       string
	MTU        uint32
	BufferSize uint32
	Bytes      int64
}

func (c peerConfig) env() []string {
	return append(os.Environ(),
		peerEnv+"=1",
		"PEER_IMPL="+c.Impl,
		"PEER_MODE="+c.Mode,
		"PEER_MTU="+strconv.Itoa(int(c.MTU)),
		"PEER_BUFSIZE="+strconv.Itoa(int(c.BufferSize)),
		"PEER_BYTES="+strconv.FormatInt(c.Bytes, 10),
	)
}

func peerConfigFromEnv() peerConfig {
	atoi := func(k string) int64 { v, _ := strconv.ParseInt(os.Getenv(k), 10, 64); return v }
	return peerConfig{
		Impl:       os.Getenv("PEER_IMPL"),
		Mode:       os.Getenv("PEER_MODE"),
		MTU:        uint32(atoi("PEER_MTU")),
		BufferSize: uint32(atoi("PEER_BUFSIZE")),
		Bytes:      atoi("PEER_BYTES"),
	}
}

func TestMain(m *testing.M) {
	if os.Getenv(peerEnv) != "" {
		if err := peerMain(peerConfigFromEnv()); err != nil {
			fmt.Fprintln(os.Stderr, "peer:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// peerMain is the child: it receives the queue pair on fd 3, runs a stack on
// a client endpoint, listens, says "ready" on stdout and serves one
// connection in its mode.
func peerMain(cfg peerConfig) error {
	const sock = 3
	fds, err := recvFDs(sock, queue.FDsPerPair)
	if err != nil {
		return err
	}
	pair, err := queue.PairFrom(fds)
	if err != nil {
		return err
	}
	var ep stack.LinkEndpoint
	switch cfg.Impl {
	case ours:
		ep, err = NewClient(Options{Pair: pair, MTU: cfg.MTU, BufferSize: cfg.BufferSize, PeerFD: sock, Logger: testLogger(), Poll: testPoll(),
			OnClosed: func(error) { os.Exit(3) }})
		pair.Close()
	case gvisor:
		// gVisor's client keeps using the descriptors it is given (it
		// does not dup the TX eventfd): keep them open.
		tx, _ := sharedmem.QueueConfigFromFDs(pair.TX.FDs())
		rx, _ := sharedmem.QueueConfigFromFDs(pair.RX.FDs())
		ep, err = sharedmem.New(sharedmem.Options{MTU: cfg.MTU, BufferSize: cfg.BufferSize, TX: tx, RX: rx, PeerFD: -1})
	default:
		err = fmt.Errorf("unknown client implementation %q", cfg.Impl)
	}
	if err != nil {
		return err
	}
	s, err := hostStack(ep, clientAddr)
	if err != nil {
		return err
	}
	ln, err := listenStack(s, clientAddr)
	if err != nil {
		return err
	}
	if cl, ok := ep.(*Client); ok && os.Getenv("SHM_DEBUG") != "" {
		go func() {
			for {
				time.Sleep(2 * time.Second)
				fmt.Fprintf(os.Stderr, "client %+v\n", cl.Stats().Snapshot())
			}
		}()
	}
	fmt.Println("ready")
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	switch cfg.Mode {
	case modeExchange:
		err = exchange(c, cfg.Bytes, 2, 1)
	case modeEcho:
		_, err = io.Copy(c, c)
	case modeSink:
		_, err = io.Copy(io.Discard, c)
	case modeSource:
		err = sendPattern(c, cfg.Bytes, 2)
	default:
		err = fmt.Errorf("unknown mode %q", cfg.Mode)
	}
	if err != nil {
		return err
	}
	// Data written is not data delivered: stay alive until the parent
	// has read everything and closed.
	c.(*gonet.TCPConn).CloseWrite()
	_, err = io.Copy(io.Discard, c)
	return err
}

// twoProcess is a running parent/child pair: the parent's stack and a
// connection to the child.
type twoProcess struct {
	Conn  net.Conn
	Stack *stack.Stack
	Link  stack.LinkEndpoint
	cmd   *exec.Cmd
	impl  string
}

// startTwoProcess starts a child client of implementation clientImpl and a
// server of implementation serverImpl here, and connects to the child.
func startTwoProcess(t testing.TB, serverImpl string, cfg peerConfig, sizes queue.Sizes) *twoProcess {
	t.Helper()
	cfg.BufferSize = sizes.BufferSize
	pair, err := queue.NewPair(sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer pair.Close()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The parent's end stays open for the child's lifetime: it is the
	// child's PeerFD.
	t.Cleanup(func() { unix.Close(sp[0]) })
	child := os.NewFile(uintptr(sp[1]), "peer")
	defer child.Close()

	var ep stack.LinkEndpoint
	switch serverImpl {
	case ours:
		ep, err = NewServer(Options{Pair: pair, MTU: cfg.MTU, PeerFD: sp[0], Logger: testLogger(), Poll: testPoll()})
	case gvisor:
		tx, _ := sharedmem.QueueConfigFromFDs(pair.TX.FDs())
		rx, _ := sharedmem.QueueConfigFromFDs(pair.RX.FDs())
		ep, err = sharedmem.NewServerEndpoint(sharedmem.Options{MTU: cfg.MTU, BufferSize: sizes.BufferSize, TX: tx, RX: rx, PeerFD: -1})
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := sendFDs(sp[0], pair.FDs()); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = cfg.env()
	cmd.ExtraFiles = []*os.File{child}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	tp := &twoProcess{cmd: cmd, Link: ep, impl: serverImpl}
	t.Cleanup(func() { tp.close() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child did not get ready: %q, %v", line, err)
	}
	if tp.Stack, err = hostStack(ep, serverAddr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), transferTimeout)
	defer cancel()
	if tp.Conn, err = dialStack(ctx, tp.Stack, clientAddr); err != nil {
		t.Fatal(err)
	}
	return tp
}

// wait waits for the child to exit and reports how it did.
func (tp *twoProcess) wait() error {
	if tp.Conn != nil {
		tp.Conn.Close()
	}
	if tp.cmd.Process == nil {
		return nil
	}
	err := tp.cmd.Wait()
	tp.cmd.Process = nil
	return err
}

func (tp *twoProcess) close() {
	if tp.cmd.Process != nil {
		tp.cmd.Process.Kill()
		tp.wait()
	}
	if tp.Stack != nil {
		if tp.impl == ours {
			closeStack(tp.Stack, tp.Link)
		} else {
			// gVisor's server endpoint never returns from Wait.
			tp.Stack.Close()
		}
	}
}

// sendFDs sends fds over the unix socket sock in one message.
func sendFDs(sock int, fds []int) error {
	return unix.Sendmsg(sock, []byte{'q'}, unix.UnixRights(fds...), nil, 0)
}

// recvFDs receives exactly n descriptors from the unix socket sock.
func recvFDs(sock, n int) ([]int, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4*n))
	_, oobn, flags, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("recvmsg: %w", err)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return nil, fmt.Errorf("recvmsg: control message truncated")
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		f, err := unix.ParseUnixRights(&m)
		if err != nil {
			return nil, err
		}
		fds = append(fds, f...)
	}
	if len(fds) != n {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("got %d descriptors, want %d", len(fds), n)
	}
	return fds, nil
}

// testLogger logs to stderr when SHM_DEBUG is set.
func testLogger() *slog.Logger {
	if os.Getenv("SHM_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testPoll lets a benchmark run try other polling bounds (SHM_POLL=20us).
func testPoll() time.Duration {
	d, _ := time.ParseDuration(os.Getenv("SHM_POLL"))
	return d
}
