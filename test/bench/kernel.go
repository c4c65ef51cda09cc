package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/node"
	"github.com/shm-cni/shm-cni/test/e2e/pattern"
)

// iperfPort is the iperf3 servers' port.
const iperfPort = 5201

// nsName is the name `ip netns` knows a namespace by.
func nsName(x ns.NetNS) string { return filepath.Base(x.Path()) }

// iperfServer starts `iperf3 -s` on e's address in e's namespace and waits
// until it accepts connections.
func (b *bench) iperfServer(ctx context.Context, e kend) error {
	logf, err := os.Create(filepath.Join(b.tmp, "iperf3-"+e.name+".log"))
	if err != nil {
		return fmt.Errorf("iperf3 server in %s: %w", e.name, err)
	}
	defer logf.Close()
	cmd := exec.Command("ip", "netns", "exec", nsName(e.ns), "iperf3", "-s", "-B", e.addr.String(), "-p", strconv.Itoa(iperfPort))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := b.startProc(cmd); err != nil {
		return err
	}
	to := netip.AddrPortFrom(e.addr, iperfPort)
	for deadline := time.Now().Add(10 * time.Second); ; {
		var c net.Conn
		err := e.ns.Do(func(ns.NetNS) error {
			var err error
			c, err = net.DialTimeout("tcp", to.String(), time.Second)
			return err
		})
		if err == nil {
			c.Close()
			// Let it log the probe's aborted test and listen again.
			time.Sleep(100 * time.Millisecond)
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("iperf3 server in %s: not listening on %s: %w", e.name, to, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// iperfClient runs `iperf3 -c` from src to dst's server and returns the
// receiver's bit/s.
func (b *bench) iperfClient(ctx context.Context, src, dst kend, streams int) (tputSample, error) {
	secs := strconv.Itoa(int(b.cfg.tputTime / time.Second))
	var lastErr error
	for range 3 { // the server takes one test at a time; a busy one refuses
		cmd := exec.CommandContext(ctx, "ip", "netns", "exec", nsName(src.ns), "iperf3", "-J",
			"-c", dst.addr.String(), "-p", strconv.Itoa(iperfPort), "-t", secs, "-P", strconv.Itoa(streams))
		cmd.SysProcAttr = procAttr()
		var out bytes.Buffer
		cmd.Stdout = &out
		runErr := cmd.Run()
		var res struct {
			Error string `json:"error"`
			End   struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
					Bytes         float64 `json:"bytes"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			lastErr = fmt.Errorf("iperf3 %s -> %s: %w (run: %v)", src.name, dst.name, err, runErr)
		} else if res.Error != "" {
			lastErr = fmt.Errorf("iperf3 %s -> %s: %s", src.name, dst.name, res.Error)
		} else if res.End.SumReceived.BitsPerSecond > 0 {
			return tputSample{bitsPerSecond: res.End.SumReceived.BitsPerSecond, bytes: res.End.SumReceived.Bytes}, nil
		} else {
			lastErr = fmt.Errorf("iperf3 %s -> %s: no result (run: %v)", src.name, dst.name, runErr)
		}
		if ctx.Err() != nil {
			return tputSample{}, ctx.Err()
		}
		time.Sleep(500 * time.Millisecond)
	}
	return tputSample{}, lastErr
}

// kernelTransfers runs streams transfers of amt from src to dst with
// kernel sockets, sending zeros and counting them as the sandboxes do in
// the benchmark: the same Go code as theirs, for a like-for-like kernel
// figure.
func kernelTransfers(ctx context.Context, src, dst kend, streams int, amt node.Amount) (tputSample, error) {
	ln, err := node.ListenIn(dst.ns, netip.AddrPortFrom(dst.addr, 0))
	if err != nil {
		return tputSample{}, err
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	to := netip.AddrPortFrom(dst.addr, uint16(ln.Addr().(*net.TCPAddr).Port))
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		long      time.Duration
		sent, got int64
		errs      []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	for range streams {
		wg.Go(func() {
			c, err := ln.Accept()
			if err != nil {
				fail(err)
				return
			}
			defer c.Close()
			n, err := io.Copy(io.Discard, c)
			if err != nil {
				fail(err)
			}
			mu.Lock()
			got += n
			mu.Unlock()
		})
		wg.Go(func() {
			n, d, err := node.SendZerosFrom(ctx, src.ns, to, amt)
			if err != nil {
				fail(err)
				ln.Close()
				return
			}
			mu.Lock()
			long = max(long, d)
			sent += n
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(errs) == 0 && got != sent {
		errs = append(errs, fmt.Errorf("received %d bytes, want the %d sent", got, sent))
	}
	if len(errs) > 0 {
		return tputSample{}, errs[0]
	}
	return tputSample{bitsPerSecond: float64(got) * 8 / long.Seconds(), bytes: float64(got)}, nil
}

// kernelRTT serves echo on dst with kernel sockets and measures from src.
func kernelRTT(ctx context.Context, src, dst kend, count int) ([]time.Duration, error) {
	to, stop, err := serveIn(dst, func(c net.Conn) { io.Copy(c, c) })
	if err != nil {
		return nil, err
	}
	defer stop()
	return dialRTT(ctx, src, to, count)
}

// serveIn listens on dst's address (a port of the kernel's choice) in its
// namespace and runs serve on each connection it accepts, closing it
// after; stop closes the listener and waits for every serve.
func serveIn(dst kend, serve func(net.Conn)) (_ netip.AddrPort, stop func(), _ error) {
	ln, err := node.ListenIn(dst.ns, netip.AddrPortFrom(dst.addr, 0))
	if err != nil {
		return netip.AddrPort{}, nil, err
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				serve(c)
			})
		}
	})
	stop = func() {
		ln.Close()
		wg.Wait()
	}
	return netip.AddrPortFrom(dst.addr, uint16(ln.Addr().(*net.TCPAddr).Port)), stop, nil
}

// dialRTT connects from src's namespace to an echo server at to and
// measures round trips.
func dialRTT(ctx context.Context, src kend, to netip.AddrPort, count int) ([]time.Duration, error) {
	var c net.Conn
	err := src.ns.Do(func(ns.NetNS) error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", to.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connect from %s to %s: %w", src.name, to, err)
	}
	defer c.Close()
	return pattern.RoundTrips(ctx, c, count)
}
