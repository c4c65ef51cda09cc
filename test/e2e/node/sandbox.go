package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// SinkPort is the port sandbox servers listen on.
const SinkPort = 7000

// Sandbox is a running sandbox workload program on a shm pod's link.
type Sandbox struct {
	pod   *Pod           // immutable
	proc  *process       // immutable
	stdin io.WriteCloser // immutable; closed by the process's Wait too
	// LogPath is the file its stderr goes to. Immutable.
	LogPath string
}

// PID returns the sandbox's process id.
func (s *Sandbox) PID() int { return s.proc.pid() }

// StartSandbox runs the sandbox program in p's netns on p's link socket
// with args after --socket, for example "--mode", "echo". Its stderr is
// appended to LogDir()/sandbox-<pod>.log. Only one sandbox may hold a link
// at a time: the agent refuses a second. Close kills it if it still runs.
func (n *Node) StartSandbox(p *Pod, args ...string) (*Sandbox, error) {
	return n.startProgram(p, n.opts.Binaries.Sandbox, "sandbox", args, n.opts.SandboxEnv)
}

// StartHostile runs the hostile sandbox program (test/e2e/hostile) on p's
// link like StartSandbox; its stderr goes to LogDir()/hostile-<pod>.log.
func (n *Node) StartHostile(p *Pod, args ...string) (*Sandbox, error) {
	return n.startProgram(p, n.opts.Binaries.Hostile, "hostile", args, nil)
}

func (n *Node) startProgram(p *Pod, bin, name string, args, env []string) (*Sandbox, error) {
	if p.SocketPath == "" {
		return nil, fmt.Errorf("start %s for %s: not a shm pod", name, p.Name)
	}
	logPath := filepath.Join(n.LogDir(), name+"-"+p.Name+".log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("start %s for %s: %w", name, p.Name, err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, append([]string{"--socket", p.SocketPath}, args...)...)
	cmd.Stderr = logf
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, fmt.Errorf("start %s for %s: node closed", name, p.Name)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start %s for %s: %w", name, p.Name, err)
	}
	proc, err := startIn(p.NS, name+" "+p.Name, cmd, true)
	if err != nil {
		// A failed Start closed both ends; one that never ran did not.
		stdin.Close()
		cmd.Stdin.(*os.File).Close()
		return nil, fmt.Errorf("start %s for %s: %w", name, p.Name, err)
	}
	s := &Sandbox{pod: p, proc: proc, stdin: stdin, LogPath: logPath}
	// Forget those that ended, so that many short-lived senders do not
	// pile up; what they used stays counted.
	live := n.sandboxes[:0]
	for _, o := range n.sandboxes {
		if done, _ := o.proc.exited(); !done {
			live = append(live, o)
		} else {
			n.endedSandboxCPU += o.proc.cpu()
		}
	}
	n.sandboxes = append(live, s)
	return s, nil
}

func (s *Sandbox) nextLine(ctx context.Context, prefix string) (string, error) {
	for {
		select {
		case l, ok := <-s.proc.stdout:
			if !ok {
				<-s.proc.done
				return "", fmt.Errorf("sandbox %s exited (%v) before printing %q; log:\n%s", s.pod.Name, s.proc.err, prefix, tail(s.LogPath, 10))
			}
			if strings.HasPrefix(l, prefix) {
				return l, nil
			}
		case <-ctx.Done():
			return "", fmt.Errorf("sandbox %s: waiting for %q: %w", s.pod.Name, prefix, ctx.Err())
		}
	}
}

// WriteLine writes l and a newline to the sandbox's stdin (the rtt mode
// reads its counts there).
func (s *Sandbox) WriteLine(l string) error {
	if _, err := io.WriteString(s.stdin, l+"\n"); err != nil {
		return fmt.Errorf("sandbox %s: stdin: %w", s.pod.Name, err)
	}
	return nil
}

// CloseInput ends the sandbox's stdin.
func (s *Sandbox) CloseInput() error {
	if err := s.stdin.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("sandbox %s: stdin: %w", s.pod.Name, err)
	}
	return nil
}

// Stop stops the sandbox (SIGTERM to its pid) and waits for it.
func (s *Sandbox) Stop() error {
	if err := s.proc.stop(); err != nil {
		return fmt.Errorf("sandbox %s: %w", s.pod.Name, err)
	}
	return nil
}

// Wait waits for the sandbox to exit and returns its exit error.
func (s *Sandbox) Wait(ctx context.Context) error {
	select {
	case <-s.proc.done:
		if s.proc.err != nil {
			return fmt.Errorf("sandbox %s: %w; log:\n%s", s.pod.Name, s.proc.err, tail(s.LogPath, 10))
		}
		return nil
	case <-ctx.Done():
		s.proc.kill()
		return fmt.Errorf("sandbox %s: %w", s.pod.Name, ctx.Err())
	}
}

// ensureSink returns the pod's sink server, starting it (and waiting until
// it listens) when none runs.
func (p *Pod) ensureSink(ctx context.Context) (*Sandbox, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.server != nil {
		if done, _ := p.server.proc.exited(); !done {
			return p.server, nil
		}
		p.server = nil
	}
	s, err := p.n.StartSandbox(p, "--mode", "sink", "--port", strconv.Itoa(SinkPort), "--verify="+strconv.FormatBool(!p.n.opts.NoVerify))
	if err != nil {
		return nil, err
	}
	if _, err := s.nextLine(ctx, "ready"); err != nil {
		s.proc.kill()
		return nil, err
	}
	p.server = s
	return s, nil
}

// stopServer stops the pod's sandbox server, if one runs, so that the link
// is free for another sandbox.
func (p *Pod) stopServer() {
	p.mu.Lock()
	s := p.server
	p.server = nil
	p.mu.Unlock()
	if s != nil {
		s.proc.stop()
	}
}

// sinkLine matches what a sandbox sink prints per connection:
// "sink: N bytes from ADDR:PORT in DURATION (R Mbit/s) STATUS".
var sinkLine = regexp.MustCompile(`^sink: (\d+) bytes from (\S+) in (\S+) \(\S+ Mbit/s\) (.*)$`)

// ParseSinkLine parses a sandbox sink's report: bytes received, the
// sender's address and whether every byte was the pattern's (verified) or
// the sink only counted them (--verify=false); a bad byte is an error.
func ParseSinkLine(l string) (n int64, from netip.Addr, verified bool, err error) {
	m := sinkLine.FindStringSubmatch(l)
	if m == nil {
		return 0, netip.Addr{}, false, fmt.Errorf("not a sink report: %q", l)
	}
	n, err = strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, netip.Addr{}, false, fmt.Errorf("sink report %q: %w", l, err)
	}
	ap, err := netip.ParseAddrPort(m[2])
	if err != nil {
		return 0, netip.Addr{}, false, fmt.Errorf("sink report %q: %w", l, err)
	}
	switch m[4] {
	case "verified":
		return n, ap.Addr().Unmap(), true, nil
	case "counted":
		return n, ap.Addr().Unmap(), false, nil
	}
	return n, ap.Addr().Unmap(), false, fmt.Errorf("sandbox sink: %s", m[4])
}

// sentLine matches a sandbox sender's report:
// "sent N bytes to ADDR:PORT in DURATION (R Mbit/s)".
var sentLine = regexp.MustCompile(`^sent (\d+) bytes to (\S+) in (\S+) \(`)

// ParseSentLine parses a sandbox sender's report: bytes sent and the time
// from connection to the receiver's close.
func ParseSentLine(l string) (int64, time.Duration, error) {
	m := sentLine.FindStringSubmatch(l)
	if m == nil {
		return 0, 0, fmt.Errorf("not a send report: %q", l)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("send report %q: %w", l, err)
	}
	d, err := time.ParseDuration(m[3])
	if err != nil {
		return 0, 0, fmt.Errorf("send report %q: %w", l, err)
	}
	return n, d, nil
}

// SenderTCP is how a sandbox sender's TCP fared over a transfer, from its
// netstack's counters.
type SenderTCP struct {
	// Segments and Acks are the segments sent and received.
	Segments    int64 `json:"segments"`
	Acks        int64 `json:"acks"`
	Retransmits int64 `json:"retransmits"`
	// Recoveries counts the loss recoveries the sender entered (each
	// cuts its congestion window); Spurious those it found needless
	// afterwards (DSACK, timestamps), whose cut the runsc patch series'
	// gVisor undoes (hack/runsc 0012); Timeouts the retransmission
	// timeouts, each of which cuts the window to one segment.
	Recoveries int64 `json:"recoveries"`
	Spurious   int64 `json:"spurious"`
	Timeouts   int64 `json:"timeouts"`
	// LinkDrops counts the frames the sender's link dropped for want of
	// room in its ring: losses the link caused.
	LinkDrops int64 `json:"linkDrops"`
}

// Add adds o's counters to s's (the streams of one measurement).
func (s *SenderTCP) Add(o SenderTCP) {
	s.Segments += o.Segments
	s.Acks += o.Acks
	s.Retransmits += o.Retransmits
	s.Recoveries += o.Recoveries
	s.Spurious += o.Spurious
	s.Timeouts += o.Timeouts
	s.LinkDrops += o.LinkDrops
}

// tcpLine matches a sandbox sender's TCP report.
var tcpLine = regexp.MustCompile(`^tcp: segments (\d+), acks (\d+), retransmits (\d+), recoveries (\d+), spurious (\d+), timeouts (\d+), link drops (\d+)$`)

// ParseTCPLine parses a sandbox sender's TCP report:
// "tcp: segments N, acks N, retransmits N, recoveries N, spurious N, timeouts N, link drops N".
func ParseTCPLine(l string) (SenderTCP, error) {
	m := tcpLine.FindStringSubmatch(l)
	if m == nil {
		return SenderTCP{}, fmt.Errorf("not a TCP report: %q", l)
	}
	var v [7]int64
	for i := range v {
		var err error
		if v[i], err = strconv.ParseInt(m[i+1], 10, 64); err != nil {
			return SenderTCP{}, fmt.Errorf("TCP report %q: %w", l, err)
		}
	}
	return SenderTCP{Segments: v[0], Acks: v[1], Retransmits: v[2], Recoveries: v[3], Spurious: v[4], Timeouts: v[5], LinkDrops: v[6]}, nil
}
