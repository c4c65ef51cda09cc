package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The reference a sandbox has without shm-cni: the same sandbox workload's
// netstack on a pod of the bridge plugin, attached to the pod's veth
// through an AF_PACKET socket, as runsc's network=sandbox attaches a gVisor
// pod (test/e2e/packetlink), with and without GSO. Sandbox to sandbox then
// crosses AF_PACKET, the veth, the kernel bridge, the veth and AF_PACKET.

// packetSinkPort and packetEchoPort are where the reference sandboxes serve.
const (
	packetSinkPort = 7100
	packetEchoPort = 7101
)

// packetRef is one variant (with or without GSO) of the reference, on a
// bridge of its own: a sink and an echo sandbox serving in pods of their
// own, pods for the senders and the netstack client, and a kernel pod.
type packetRef struct {
	b       *bench
	gso     bool
	sink    kend
	echo    kend
	senders []kend
	client  kend
	kernel  kend
	sinkOut *lineReader
}

// The variants' bridges and subnets, apart from the other references'.
var packetNets = map[bool]struct{ bridge, subnet string }{
	false: {"cnibench1", "10.253.0.0/16"},
	true:  {"cnibench2", "10.254.0.0/16"},
}

// newPacketRef makes the variant's bridge network and pods in host and
// starts its servers, checking that each answers the kernel pod.
func (b *bench) newPacketRef(ctx context.Context, host ns.NetNS, gso bool, senders int) (*packetRef, error) {
	tag := "pkt"
	if gso {
		tag = "pktgso"
	}
	br, err := b.newNamedRefNet(tag, "bridge", packetNets[gso].bridge, packetNets[gso].subnet, host)
	if err != nil {
		return nil, err
	}
	pod := func(name string) (kend, error) {
		x, err := b.newNS()
		if err != nil {
			return kend{}, err
		}
		a, err := br.add(ctx, "bench-"+tag+"-"+name, x)
		if err != nil {
			return kend{}, err
		}
		return kend{tag + "-" + name, x, a}, nil
	}
	r := &packetRef{b: b, gso: gso}
	if r.kernel, err = pod("kernel"); err != nil {
		return nil, err
	}
	if r.sink, err = pod("sink"); err != nil {
		return nil, err
	}
	if r.echo, err = pod("echo"); err != nil {
		return nil, err
	}
	if r.client, err = pod("client"); err != nil {
		return nil, err
	}
	for i := range senders {
		s, err := pod("send" + strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		r.senders = append(r.senders, s)
	}
	if r.sinkOut, err = r.serve(ctx, r.sink, packetSinkPort, r.kernel, "--mode", "sink", "--verify=false"); err != nil {
		return nil, err
	}
	// The sink reports the probe's connection too.
	if _, err := r.sinkOut.next(ctx, "sink: "); err != nil {
		return nil, fmt.Errorf("%s: %w", r.sink.name, err)
	}
	if _, err := r.serve(ctx, r.echo, packetEchoPort, r.kernel, "--mode", "echo"); err != nil {
		return nil, err
	}
	return r, nil
}

// serve starts a server sandbox in e on port and returns its output once
// it answers a TCP connection from probe. A server that does not is
// replaced, up to three times; the log says so, with its log and the
// namespace's packet sockets.
func (r *packetRef) serve(ctx context.Context, e kend, port uint16, probe kend, args ...string) (*lineReader, error) {
	args = append(args, "--port", strconv.Itoa(int(port)))
	to := netip.AddrPortFrom(e.addr, port)
	for try := 1; ; try++ {
		lr, err := r.start(ctx, e, args...)
		if err != nil {
			return nil, err
		}
		if _, err := lr.next(ctx, "ready"); err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
		err = probe.ns.Do(func(ns.NetNS) error {
			c, err := net.DialTimeout("tcp", to.String(), 3*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return lr, nil
		}
		var sockets []byte
		e.ns.Do(func(ns.NetNS) error {
			sockets, _ = os.ReadFile("/proc/thread-self/net/packet")
			return nil
		})
		r.b.log.Warn("AF_PACKET reference: a server sandbox does not answer", "pod", e.name, "try", try, "err", err,
			"log", r.logTail(e), "packet sockets", string(sockets))
		// SIGTERM: the sandbox gives the kernel its addresses back.
		lr.cmd.Process.Signal(syscall.SIGTERM)
		lr.cmd.Wait()
		if try == 3 {
			return nil, fmt.Errorf("%s: the sandbox does not answer on %s: %w", e.name, to, err)
		}
	}
}

// name returns the variant's row name.
func (r *packetRef) name(what string) string {
	if r.gso {
		return "AF_PACKET+GSO " + what
	}
	return "AF_PACKET " + what
}

// start runs the sandbox program in e's namespace on its eth0 with args;
// its stdout comes line by line, its stderr goes to the run's scratch
// directory.
func (r *packetRef) start(ctx context.Context, e kend, args ...string) (*lineReader, error) {
	args = append([]string{"--packet", "eth0"}, args...)
	if r.gso {
		args = append(args, "--packet-gso")
	}
	logf, err := os.OpenFile(filepath.Join(r.b.tmp, "sandbox-"+e.name+".log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(r.b.bins.Sandbox, args...)
	cmd.Stderr = logf
	if len(r.b.cfg.sandboxEnv) > 0 {
		cmd.Env = append(os.Environ(), r.b.cfg.sandboxEnv...)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		out.Close()
		cmd.Stdout.(*os.File).Close()
		return nil, err
	}
	if err := r.b.startProcIn(e.ns, cmd); err != nil {
		// A failed Start closed the pipes; one that never ran did not.
		in.Close()
		out.Close()
		cmd.Stdin.(*os.File).Close()
		cmd.Stdout.(*os.File).Close()
		return nil, err
	}
	lr := &lineReader{lines: make(chan string, 64), cmd: cmd, stdin: in}
	go func() {
		defer close(lr.lines)
		sc := bufio.NewScanner(out)
		// A round-trip report is one line of every round trip's time.
		sc.Buffer(nil, 4<<20)
		for sc.Scan() {
			lr.lines <- sc.Text()
		}
	}()
	return lr, nil
}

// transfer sends amt from streams sender sandboxes at once to the sink
// sandbox and returns the aggregate rate, as transfers does for shm-cni's
// sandboxes.
func (r *packetRef) transfer(ctx context.Context, streams int, amt node.Amount) (tputSample, error) {
	to := netip.AddrPortFrom(r.sink.addr, packetSinkPort)
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		long      time.Duration
		sent, got int64
		errs      []error
	)
	for i := range streams {
		e := r.senders[min(i, len(r.senders)-1)]
		wg.Go(func() {
			n, d, err := r.send(ctx, e, to, amt)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w (sink: %s)", e.name, err, r.logTail(r.sink)))
				return
			}
			long = max(long, d)
			sent += n
		})
	}
	wg.Wait()
	// The sink reports every connection; all of them must have arrived.
	for range streams {
		l, err := r.sinkOut.next(ctx, "sink: ")
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.sink.name, err))
			break
		}
		n, _, _, err := node.ParseSinkLine(l)
		if err != nil {
			errs = append(errs, err)
		}
		got += n
	}
	if len(errs) == 0 && got != sent {
		errs = append(errs, fmt.Errorf("sink got %d bytes, want the %d sent", got, sent))
	}
	if len(errs) > 0 {
		return tputSample{}, errs[0]
	}
	return tputSample{bitsPerSecond: float64(got) * 8 / long.Seconds(), bytes: float64(got)}, nil
}

// send runs one sender sandbox in e's namespace and returns the bytes it
// sent and the time it reports.
func (r *packetRef) send(ctx context.Context, e kend, to netip.AddrPort, amt node.Amount) (int64, time.Duration, error) {
	lr, err := r.start(ctx, e, append([]string{"--mode", "send", "--to", to.String(), "--verify=false"}, amt.SenderArgs()...)...)
	if err != nil {
		return 0, 0, err
	}
	l, lerr := lr.next(ctx, "sent ")
	if err := lr.cmd.Wait(); err != nil {
		return 0, 0, fmt.Errorf("sender: %w: %s", err, r.logTail(e))
	}
	if lerr != nil {
		return 0, 0, lerr
	}
	got, d, err := node.ParseSentLine(l)
	if err == nil && amt.Duration == 0 && got != amt.Bytes {
		err = fmt.Errorf("sent %d bytes, want %d", got, amt.Bytes)
	}
	return got, d, err
}

// rtt measures round trips from a netstack client (the sandbox program in
// its rtt mode) on the client pod's veth, through AF_PACKET as the
// sandboxes, to the echo sandbox.
func (r *packetRef) rtt(ctx context.Context, count int) (ds []time.Duration, err error) {
	to := netip.AddrPortFrom(r.echo.addr, packetEchoPort)
	lr, err := r.start(ctx, r.client, "--mode", "rtt", "--to", to.String())
	if err != nil {
		return nil, err
	}
	c := &rttClient{
		pid:  lr.cmd.Process.Pid,
		send: func(l string) error { _, err := io.WriteString(lr.stdin, l+"\n"); return err },
		next: lr.next,
		end: func(ctx context.Context) error {
			lr.stdin.Close()
			// At the end of stdin the program gives the kernel the
			// pod's addresses back and exits.
			stop := context.AfterFunc(ctx, func() { lr.cmd.Process.Kill() })
			defer stop()
			if err := lr.cmd.Wait(); err != nil {
				return fmt.Errorf("%w: %s", err, r.logTail(r.client))
			}
			return nil
		},
	}
	defer func() {
		if cerr := c.close(ctx); err == nil {
			err = cerr
		}
	}()
	if _, err := lr.next(ctx, "ready"); err != nil {
		return nil, fmt.Errorf("%s: %w: %s", r.client.name, err, r.logTail(r.client))
	}
	return c.round(ctx, count)
}

// logTail returns the last lines of the sandbox log of e.
func (r *packetRef) logTail(e kend) string {
	b, _ := os.ReadFile(filepath.Join(r.b.tmp, "sandbox-"+e.name+".log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	var sockets []byte
	e.ns.Do(func(ns.NetNS) error {
		sockets, _ = os.ReadFile("/proc/thread-self/net/packet")
		return nil
	})
	return strings.Join(lines[max(0, len(lines)-3):], " | ") + " | packet sockets: " + strings.Join(strings.Fields(string(sockets)), " ")
}

// lineReader is a started program's stdout, line by line, and its stdin.
type lineReader struct {
	lines chan string
	cmd   *exec.Cmd
	stdin io.WriteCloser // closed by cmd.Wait too
}

// next returns the next line starting with prefix, skipping others.
func (lr *lineReader) next(ctx context.Context, prefix string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		select {
		case l, ok := <-lr.lines:
			if !ok {
				return "", fmt.Errorf("no %q line: %w", prefix, io.ErrUnexpectedEOF)
			}
			if strings.HasPrefix(l, prefix) {
				return l, nil
			}
		case <-ctx.Done():
			return "", fmt.Errorf("no %q line: %w", prefix, ctx.Err())
		}
	}
}
