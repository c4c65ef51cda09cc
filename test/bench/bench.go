package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// bench is one benchmark run and everything it made.
type bench struct {
	cfg config       // immutable
	log *slog.Logger // immutable
	// tmp is the run's scratch directory; bins the shm-cni programs,
	// refBin the reference plugins' directory. Immutable.
	tmp    string
	bins   node.Binaries
	refBin string

	// mu guards the fields below.
	mu sync.Mutex
	// netns are the namespaces made outside any node, deleted by close.
	netns []ns.NetNS
	// nodes are the shm-cni nodes made, closed by close.
	nodes []*node.Node
	// procs are the helper processes started (iperf3), killed by close.
	procs []*exec.Cmd
}

// newBench builds the programs into a fresh scratch directory.
func newBench(ctx context.Context, cfg config, log *slog.Logger) (_ *bench, err error) {
	if cfg.cases["tput"] || cfg.cases["policy"] {
		if _, err := exec.LookPath("iperf3"); err != nil {
			return nil, errors.New("iperf3 not found: run hack/bench-deps.sh (make bench does)")
		}
	}
	tmp, err := os.MkdirTemp("", "shm-bench")
	if err != nil {
		return nil, fmt.Errorf("scratch: %w", err)
	}
	b := &bench{cfg: cfg, log: log, tmp: tmp, refBin: filepath.Join(tmp, "ref")}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	for _, d := range []string{"bin", "ref"} {
		if err := os.Mkdir(filepath.Join(tmp, d), 0o700); err != nil {
			return nil, fmt.Errorf("scratch: %w", err)
		}
	}
	log.Info("building shm-cni, shm-agent, sandbox and the reference plugins")
	if b.bins, err = node.Build(ctx, filepath.Join(tmp, "bin"), node.BuildOptions{}); err != nil {
		return nil, err
	}
	if err := buildRefPlugins(ctx, b.refBin); err != nil {
		return nil, err
	}
	return b, nil
}

// newNS makes a namespace close deletes.
func (b *bench) newNS() (ns.NetNS, error) {
	x, err := node.NewNetNS()
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.netns = append(b.netns, x)
	b.mu.Unlock()
	return x, nil
}

// newNode starts an shm-cni node close closes.
func (b *bench) newNode(ctx context.Context, opts node.Options) (*node.Node, error) {
	opts.Binaries = b.bins
	opts.ExtraAgentArgs = append(opts.ExtraAgentArgs, b.cfg.agentArgs...)
	opts.AgentEnv = append(opts.AgentEnv, b.cfg.agentEnv...)
	opts.SandboxEnv = append(opts.SandboxEnv, b.cfg.sandboxEnv...)
	if b.cfg.verbose {
		opts.Logger = b.log
	}
	n, err := node.New(ctx, opts)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.nodes = append(b.nodes, n)
	b.mu.Unlock()
	return n, nil
}

// closeNode closes n now.
func (b *bench) closeNode(n *node.Node) error {
	b.mu.Lock()
	for i, o := range b.nodes {
		if o == n {
			b.nodes = append(b.nodes[:i], b.nodes[i+1:]...)
			break
		}
	}
	b.mu.Unlock()
	return n.Close()
}

// startProc starts cmd (SIGKILLed if the bench dies) and has close kill it.
func (b *bench) startProc(cmd *exec.Cmd) error { return b.startProcIn(nil, cmd) }

// startProcIn is startProc inside n (nil: the bench's own namespace).
func (b *bench) startProcIn(n ns.NetNS, cmd *exec.Cmd) error {
	cmd.SysProcAttr = procAttr()
	// From the harness's spawner thread: the helper's parent-death signal
	// must not fire when some other thread of the bench ends.
	if err := node.Spawn(n, cmd); err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	b.mu.Lock()
	b.procs = append(b.procs, cmd)
	b.mu.Unlock()
	return nil
}

// close kills every process, closes every node, deletes every namespace
// and the scratch directory. It is idempotent.
func (b *bench) close() error {
	b.mu.Lock()
	procs, nodes, netns := b.procs, b.nodes, b.netns
	b.procs, b.nodes, b.netns = nil, nil, nil
	b.mu.Unlock()
	var errs []error
	// SIGTERM first, so that the sandbox programs end as they would in a
	// pod (and write their profiles: SHM_SANDBOX_CPUPROFILE); a second
	// later, those still running are killed.
	var wg sync.WaitGroup
	for _, p := range procs {
		p.Process.Signal(syscall.SIGTERM)
		wg.Go(func() {
			kill := time.AfterFunc(time.Second, func() { p.Process.Kill() })
			p.Wait()
			kill.Stop()
		})
	}
	wg.Wait()
	for _, n := range nodes {
		errs = append(errs, n.Close())
	}
	for _, x := range netns {
		errs = append(errs, node.DeleteNetNS(x))
	}
	if b.tmp != "" {
		errs = append(errs, os.RemoveAll(b.tmp))
	}
	return errors.Join(errs...)
}

// run runs the chosen cases and returns the report, partial when ctx ended
// or a setup failed (err says which).
func (b *bench) run(ctx context.Context) (*report, error) {
	start := time.Now()
	rep := &report{Machine: describeMachine(), LoadBefore: loadavg(), Started: start.UTC().Format(time.RFC3339),
		Commit: commit(ctx), Reps: b.cfg.reps, Config: b.cfg.describe()}
	defer func() {
		rep.LoadAfter = loadavg()
		rep.Seconds = time.Since(start).Seconds()
		rep.evaluateGoals()
	}()
	if b.cfg.cases["tput"] || b.cfg.cases["rtt"] || b.cfg.cases["trace"] {
		if err := b.runTraffic(ctx, rep); err != nil {
			return rep, err
		}
	}
	if b.cfg.cases["cni"] {
		if err := b.runCNI(ctx, rep); err != nil {
			return rep, err
		}
	}
	if b.cfg.cases["idle"] {
		if err := b.runIdle(ctx, rep); err != nil {
			return rep, err
		}
	}
	if b.cfg.cases["policy"] {
		if err := b.runPolicy(ctx, rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// commit names the source measured: the commit, "+dirty" with local
// changes, "unknown" outside a git checkout.
func commit(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	if st, err := exec.CommandContext(ctx, "git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(st) > 0 {
		c += "+dirty"
	}
	return c
}

// describe lists the settings for the report.
func (c config) describe() map[string]string {
	return map[string]string{
		"streams":     fmt.Sprint(c.streams),
		"time":        c.tputTime.String(),
		"bytes":       fmt.Sprint(c.bytes),
		"rtt-count":   fmt.Sprint(c.rttCount),
		"cni-pods":    fmt.Sprint(c.cniPods),
		"idle-pods":   fmt.Sprint(c.idlePods),
		"idle-window": c.idleWindow.String(),
		"policies":    fmt.Sprint(c.policies),
		"mtu":         fmt.Sprint(c.mtu),
		"shm-mtu":     shmMTUString(c.shmMTU),
		"agent-args":  strings.Join(c.agentArgs, " "),
		"agent-env":   strings.Join(c.agentEnv, " "),
		"sandbox-env": strings.Join(c.sandboxEnv, " "),
		"only":        fmtOnly(c.only),
	}
}

// fmtOnly is -only as given, or empty.
func fmtOnly(re *regexp.Regexp) string {
	if re == nil {
		return ""
	}
	return re.String()
}

// shmMTUString is -shm-mtu for the report.
func shmMTUString(mtu int) string {
	if mtu == 0 {
		return "agent default"
	}
	return fmt.Sprint(mtu)
}
