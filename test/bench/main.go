// Command bench measures shm-cni side by side with the kernel in one run:
// a plain veth pair and pods of the reference ptp and bridge CNI plugins
// against shm-cni's kernel (tap) pods, sandbox (shm) pods and the host.
// It needs root and sets everything up itself in network namespaces it
// creates; Ctrl-C or SIGTERM tears everything down.
//
//	go run ./test/bench                          # everything, ~10 minutes
//	go run ./test/bench -cases tput,rtt -reps 5  # a subset
//	go run ./test/bench -idle-pods 0,50 -idle-window 9s
//	go run ./test/bench -cases policy -reps 7   # NetworkPolicy's cost, 0/100/1000 policies
//	go run ./test/bench -cases trace            # a sandbox round trip, hop by hop (trace.go)
//
// Each case runs -reps times (at least 3) and reports its median and its
// ratio to the reference (veth for traffic, bridge for CNI latency, the
// same pairs without policy for the policy case: policy.go),
// with the project's goals marked met or not met. The table goes to
// stdout and to <out>/bench.md, the numbers to <out>/bench.json. A number
// never makes it fail: only a broken setup does.
//
// Kernel-stack ends measure throughput with iperf3 (hack/bench-deps.sh
// installs it), sandbox ends with the sandbox program's send and sink.
// Latency is 64-byte TCP request/response: a Go echo client and server in
// the namespaces, the sandbox program's echo server and its netstack
// client (the rtt mode) on a shm link.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

func main() { os.Exit(run()) }

// config is the command line.
type config struct {
	cases      map[string]bool
	reps       int
	streams    []int
	tputTime   time.Duration
	bytes      int64
	rttCount   int
	cniPods    int
	idlePods   []int
	policies   []int
	idleWindow time.Duration
	mtu        int
	shmMTU     int
	agentArgs  []string
	// agentEnv and sandboxEnv are added to the environments of the agent
	// and of the sandbox programs (shm-cni's and the AF_PACKET
	// references' alike).
	agentEnv, sandboxEnv []string
	// only, when set, keeps the traffic cases whose name it matches
	// (the references always run: ratios need them).
	only    *regexp.Regexp
	out     string
	verbose bool
}

func parseFlags() (config, error) {
	var c config
	cases := flag.String("cases", "tput,rtt,trace,cni,idle,policy", "cases to run: tput, rtt, trace (where a sandbox round trip's time goes, hop by hop), cni, idle, policy")
	flag.IntVar(&c.reps, "reps", 3, "repetitions of each case (the median is reported; at least 3)")
	streams := flag.String("streams", "1,4", "parallel TCP streams of the throughput cases")
	flag.DurationVar(&c.tputTime, "time", 3*time.Second, "duration of each throughput measurement: iperf3's, and the Go and sandbox programs' timed transfers")
	flag.Int64Var(&c.bytes, "bytes", 0, "when set, the Go and sandbox programs' transfers send this many bytes instead of sending for -time")
	flag.IntVar(&c.rttCount, "rtt-count", 5000, "64-byte round trips per latency measurement")
	flag.IntVar(&c.cniPods, "cni-pods", 100, "pods added (then deleted) concurrently per CNI latency measurement")
	idle := flag.String("idle-pods", "0,110,250", "attached idle tap pods at which the agent's RSS and CPU are measured")
	policies := flag.String("policies", "0,100,1000", "NetworkPolicy counts of the policy case (the first must be 0: the ratios' reference)")
	flag.DurationVar(&c.idleWindow, "idle-window", 30*time.Second, "CPU measurement window per pod count (split into -reps parts)")
	flag.IntVar(&c.mtu, "mtu", 1500, "MTU of shm-cni's kernel pods' links and uplink in the traffic cases (the veth, ptp and bridge references stay at 1500)")
	flag.IntVar(&c.shmMTU, "shm-mtu", 0, "MTU of shm-cni's sandbox links (the agent's --shm-mtu); 0 leaves the agent's default")
	agentArgs := flag.String("agent-args", "", "extra flags for shm-agent, space-separated (e.g. --fast-path=false)")
	agentEnv := flag.String("agent-env", "", "extra environment of shm-agent, space-separated NAME=VALUE (e.g. GOMAXPROCS=1)")
	sandboxEnv := flag.String("sandbox-env", "", "extra environment of the sandbox programs, shm-cni's and the AF_PACKET references' alike, space-separated NAME=VALUE")
	only := flag.String("only", "", "regular expression: run only the traffic cases whose name matches (e.g. 'sandbox → sandbox'); the kernel references always run")
	flag.StringVar(&c.out, "out", "bin", "directory for bench.md and bench.json")
	flag.BoolVar(&c.verbose, "v", false, "log the harness's progress in detail")
	flag.Parse()
	c.agentArgs = strings.Fields(*agentArgs)
	var err error
	if c.agentEnv, err = parseEnv(*agentEnv); err != nil {
		return c, fmt.Errorf("-agent-env: %w", err)
	}
	if c.sandboxEnv, err = parseEnv(*sandboxEnv); err != nil {
		return c, fmt.Errorf("-sandbox-env: %w", err)
	}
	if *only != "" {
		re, err := regexp.Compile(*only)
		if err != nil {
			return c, fmt.Errorf("-only: %w", err)
		}
		c.only = re
	}
	c.cases = map[string]bool{}
	for _, k := range strings.Split(*cases, ",") {
		k = strings.TrimSpace(k)
		switch k {
		case "tput", "rtt", "trace", "cni", "idle", "policy":
			c.cases[k] = true
		case "":
		default:
			return c, fmt.Errorf("-cases: unknown case %q", k)
		}
	}
	if c.streams, err = intList(*streams); err != nil {
		return c, fmt.Errorf("-streams: %w", err)
	}
	if c.idlePods, err = intList(*idle); err != nil {
		return c, fmt.Errorf("-idle-pods: %w", err)
	}
	if c.policies, err = intList(*policies); err != nil {
		return c, fmt.Errorf("-policies: %w", err)
	}
	if len(c.policies) == 0 || c.policies[0] != 0 {
		return c, fmt.Errorf("-policies %q: the first count must be 0 (the ratios' reference)", *policies)
	}
	if c.reps < 3 {
		return c, fmt.Errorf("-reps %d: want at least 3", c.reps)
	}
	if c.mtu < 1280 || c.mtu > 65535 {
		return c, fmt.Errorf("-mtu %d: want 1280..65535", c.mtu)
	}
	if c.shmMTU != 0 && (c.shmMTU < 1280 || c.shmMTU > 65535) {
		return c, fmt.Errorf("-shm-mtu %d: want 0 (the agent's default) or 1280..65535", c.shmMTU)
	}
	if c.bytes < 0 || c.rttCount <= 0 || c.cniPods <= 0 || c.idleWindow <= 0 || c.tputTime < time.Second {
		return c, fmt.Errorf("sizes must be positive (-bytes 0 or more, -time at least 1s)")
	}
	if c.tputTime%time.Second != 0 {
		// iperf3 takes whole seconds; the timed transfers must run as long.
		return c, fmt.Errorf("-time %v: want whole seconds (iperf3's -t)", c.tputTime)
	}
	return c, nil
}

// amount is what one Go or sandbox transfer sends: for -time, as long as
// iperf3 measures beside it (a stream's start then weighs the same on
// every row), or -bytes when set.
func (c config) amount() node.Amount {
	if c.bytes > 0 {
		return node.Amount{Bytes: c.bytes}
	}
	return node.Amount{Duration: c.tputTime}
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, v)
	}
	return out, nil
}

func run() int {
	cfg, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (network namespaces, TAP devices, CNI plugins)")
		return 1
	}
	level := slog.LevelInfo
	if cfg.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	b, err := newBench(ctx, cfg, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	rep, err := b.run(ctx)
	if cerr := b.close(); cerr != nil {
		log.Warn("cleanup", "err", cerr)
	}
	if rep != nil {
		if werr := rep.write(os.Stdout, cfg.out); werr != nil {
			fmt.Fprintln(os.Stderr, "bench:", werr)
			return 1
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	return 0
}

// parseEnv splits s, space-separated NAME=VALUE entries, into environment
// entries.
func parseEnv(s string) ([]string, error) {
	env := strings.Fields(s)
	for _, e := range env {
		if name, _, ok := strings.Cut(e, "="); !ok || name == "" {
			return nil, fmt.Errorf("%q is not NAME=VALUE", e)
		}
	}
	return env, nil
}
