// Command nettool is the runtime benchmark's traffic tool (make
// bench-runsc): a static binary that runs inside the pods of every runtime
// (runc, and runsc's gVisor), so that each network is measured with the same
// program at both ends. It measures the path, not the data: the runtime tiers
// verify bytes with MD5, this sink only counts them.
//
//	nettool serve                             sink on :5201, echo on :5202
//	nettool send -to ADDR -streams 4 -time 3s TCP throughput into ADDR's sink
//	nettool rr -to ADDR -count 5000           64-byte request/response
//	nettool cpu -interval 50ms                the host's busy CPU jiffies, sampled
//	nettool report -ref NETWORK/PAIR < raw    medians, ratios: a markdown table
//
// send and rr print one line "key=value ..." with the wall-clock start and
// end (unix nanoseconds) of the measurement, which the benchmark script
// matches with the host's CPU counters.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/pattern"
)

// Ports of serve.
const (
	sinkPort = 5201
	echoPort = 5202
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: nettool serve|send|rr|report [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve()
	case "send":
		err = send(os.Args[2:])
	case "rr":
		err = rr(os.Args[2:])
	case "cpu":
		err = cpuSample(os.Args[2:])
	case "report":
		err = report(os.Args[2:], os.Stdin, os.Stdout)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nettool:", err)
		os.Exit(1)
	}
}

// serve runs the sink and the echo server until killed.
func serve() error {
	sink, err := net.Listen("tcp", fmt.Sprintf(":%d", sinkPort))
	if err != nil {
		return err
	}
	echo, err := net.Listen("tcp", fmt.Sprintf(":%d", echoPort))
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	// pattern.Count reads 128 KiB at a time: io.Copy to io.Discard reads
	// 8 KiB, and in a runsc pod each read is a system call the Sentry serves.
	go func() { errc <- accept(sink, func(c net.Conn) { pattern.Count(c) }) }()
	go func() { errc <- accept(echo, func(c net.Conn) { io.Copy(c, c) }) }()
	return <-errc
}

func accept(ln net.Listener, handle func(net.Conn)) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			handle(c)
		}()
	}
}

// send writes into the sink over -streams connections for -time and
// prints the bytes written (all acknowledged: each stream closes and waits
// for the sink's close).
func send(args []string) error {
	fs := flag.NewFlagSet("send", flag.ContinueOnError)
	to := fs.String("to", "", "the server's address")
	streams := fs.Int("streams", 1, "parallel connections")
	d := fs.Duration("time", 3*time.Second, "how long to send")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *to == "" || *streams < 1 {
		return errors.New("send: -to and -streams >= 1 are required")
	}
	conns := make([]*net.TCPConn, *streams)
	for i := range conns {
		c, err := net.Dial("tcp", net.JoinHostPort(*to, fmt.Sprint(sinkPort)))
		if err != nil {
			return err
		}
		conns[i] = c.(*net.TCPConn)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total int64
		first error
	)
	start := time.Now()
	deadline := start.Add(*d)
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, 128<<10)
			var n int64
			var err error
			for time.Now().Before(deadline) {
				var k int
				k, err = c.Write(buf)
				n += int64(k)
				if err != nil {
					break
				}
			}
			if err == nil {
				err = c.CloseWrite()
			}
			if err == nil {
				_, err = io.Copy(io.Discard, c) // the sink's close: all arrived
			}
			mu.Lock()
			total += n
			if first == nil {
				first = err
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	end := time.Now()
	if first != nil {
		return first
	}
	fmt.Printf("bytes=%d seconds=%.6f start=%d end=%d\n", total, end.Sub(start).Seconds(), start.UnixNano(), end.UnixNano())
	return nil
}

// rr makes -count 64-byte round trips over one connection and prints the
// 50th and 99th percentiles in microseconds.
func rr(args []string) error {
	fs := flag.NewFlagSet("rr", flag.ContinueOnError)
	to := fs.String("to", "", "the server's address")
	count := fs.Int("count", 5000, "round trips")
	size := fs.Int("size", 64, "message size")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *to == "" || *count < 1 || *size < 1 {
		return errors.New("rr: -to, -count >= 1 and -size >= 1 are required")
	}
	c, err := net.Dial("tcp", net.JoinHostPort(*to, fmt.Sprint(echoPort)))
	if err != nil {
		return err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	msg, back := make([]byte, *size), make([]byte, *size)
	rtts := make([]time.Duration, 0, *count)
	start := time.Now()
	for range *count {
		t := time.Now()
		if _, err := c.Write(msg); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, back); err != nil {
			return err
		}
		rtts = append(rtts, time.Since(t))
	}
	end := time.Now()
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	q := func(p float64) float64 { return float64(rtts[int(p*float64(len(rtts)-1))].Nanoseconds()) / 1e3 }
	fmt.Printf("p50_us=%.1f p99_us=%.1f start=%d end=%d\n", q(0.50), q(0.99), start.UnixNano(), end.UnixNano())
	return nil
}

// cpuSample prints "unixnano busy_jiffies" every -interval until killed:
// the machine's user, nice, system, irq and softirq time from /proc/stat
// (idle, iowait and steal are not ours).
func cpuSample(args []string) error {
	fs := flag.NewFlagSet("cpu", flag.ContinueOnError)
	interval := fs.Duration("interval", 50*time.Millisecond, "sampling interval")
	if err := fs.Parse(args); err != nil {
		return err
	}
	for {
		b, err := os.ReadFile("/proc/stat")
		if err != nil {
			return err
		}
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal ...
		if len(f) < 8 || f[0] != "cpu" {
			return fmt.Errorf("cpu: unexpected /proc/stat line %q", line)
		}
		var busy uint64
		for _, i := range []int{1, 2, 3, 6, 7} {
			var v uint64
			fmt.Sscan(f[i], &v)
			busy += v
		}
		fmt.Printf("%d %d\n", time.Now().UnixNano(), busy)
		time.Sleep(*interval)
	}
}

// fields parses "k=v k=v" into a map.
func fields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}
