package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// MetricsAddr is the agent's --metrics-addr, in the host namespace.
const MetricsAddr = "127.0.0.1:9309"

// readyPoll is how often StartAgent asks a starting agent whether it is
// ready.
const readyPoll = 20 * time.Millisecond

// Agent is a running shm-agent process.
type Agent struct {
	proc *process // immutable
	// LogPath is the file its stderr (JSON logs) goes to. Immutable.
	LogPath string
}

// PID returns the agent's process id.
func (a *Agent) PID() int { return a.proc.pid() }

// CPU returns the CPU time (user and system) the running agent and every
// sandbox program the node started have used so far (sandboxes that ended
// included): with two readings, what a measurement cost shm-cni's agent and
// the sandboxes, whatever else runs on the machine.
func (n *Node) CPU() (agent, sandboxes time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.agent != nil {
		agent = n.agent.proc.cpu()
	}
	sandboxes = n.endedSandboxCPU
	for _, s := range n.sandboxes {
		sandboxes += s.proc.cpu()
	}
	return agent, sandboxes
}

// Agent returns the running agent, or nil.
func (n *Node) Agent() *Agent {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.agent
}

// AgentArgs are the agent's command-line flags.
func (n *Node) AgentArgs() []string {
	level := n.opts.AgentLogLevel
	if level == "" {
		level = "info"
	}
	var shm []string
	if n.opts.ShmMTU != 0 {
		shm = []string{"--shm-mtu=" + strconv.Itoa(n.opts.ShmMTU)}
	}
	return append(append([]string{
		"--pod-cidr=" + n.opts.PodCIDRs[0].String() + "," + n.opts.PodCIDRs[1].String(),
		"--uplink=" + Uplink,
		"--mtu=" + strconv.Itoa(n.opts.MTU),
		"--socket=" + n.SocketPath(),
		"--state-dir=" + n.StateDir(),
		"--sandbox-dir=" + n.SandboxDir(),
		"--metrics-addr=" + MetricsAddr,
		"--pprof", // the tests read heap profiles (GC)
		"--masquerade=" + strconv.FormatBool(!n.opts.NoMasquerade),
		"--log-level=" + level,
	}, shm...), n.opts.ExtraAgentArgs...)
}

// StartAgent starts the agent in the host namespace and waits until it
// answers STATUS ready. Its logs are appended to LogDir()/agent.log, over
// restarts.
func (n *Node) StartAgent(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return errors.New("start agent: node closed")
	}
	if n.agent != nil {
		return fmt.Errorf("start agent: already running as pid %d", n.agent.PID())
	}
	logPath := filepath.Join(n.LogDir(), "agent.log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	defer logf.Close() // the child has its own
	cmd := exec.Command(n.opts.Binaries.Agent, n.AgentArgs()...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if len(n.opts.AgentEnv) > 0 {
		cmd.Env = append(os.Environ(), n.opts.AgentEnv...)
	}
	p, err := startIn(n.Host, "shm-agent", cmd, false)
	if err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	a := &Agent{proc: p, LogPath: logPath}
	if err := waitReady(ctx, n.SocketPath(), p); err != nil {
		p.kill()
		return fmt.Errorf("start agent: %w; log:\n%s", err, tail(logPath, 20))
	}
	n.agent = a
	n.log.Debug("agent ready", "pid", a.PID())
	return nil
}

// waitReady asks the agent for its status until it is ready, it exits or
// ctx ends.
func waitReady(ctx context.Context, socket string, p *process) error {
	t := time.NewTicker(readyPoll)
	defer t.Stop()
	for {
		if done, err := p.exited(); done {
			return fmt.Errorf("agent exited before it was ready: %v", err)
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := agentapi.Call(cctx, socket, &agentapi.Request{Op: agentapi.OpStatus}, nil)
		cancel()
		if err == nil && resp.Status != nil && resp.Status.Ready {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent not ready: %w (last answer: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

// StopAgent stops the agent gracefully (SIGTERM to its pid) and returns its
// exit error: nil when it exited with status 0.
func (n *Node) StopAgent() error {
	n.mu.Lock()
	a := n.agent
	n.agent = nil
	n.mu.Unlock()
	if a == nil {
		return errors.New("stop agent: not running")
	}
	if err := a.proc.stop(); err != nil {
		return fmt.Errorf("stop agent pid %d: %w", a.PID(), err)
	}
	return nil
}

// KillAgent kills the agent (SIGKILL to its pid), as a crash or an OOM kill
// would, and waits for it.
func (n *Node) KillAgent() error {
	n.mu.Lock()
	a := n.agent
	n.agent = nil
	n.mu.Unlock()
	if a == nil {
		return errors.New("kill agent: not running")
	}
	a.proc.kill()
	return nil
}

// AgentExited reports whether the running agent died on its own, with its
// exit error; tests check it after traffic (a crash, a race report).
func (n *Node) AgentExited() (bool, error) {
	a := n.Agent()
	if a == nil {
		return false, nil
	}
	return a.proc.exited()
}

// GC makes the agent collect garbage (it serves a heap profile after a GC),
// so that its heap metrics then count live memory only.
func (n *Node) GC(ctx context.Context) error {
	_, err := n.HeapProfile(ctx)
	return err
}

// HeapProfile returns the agent's heap profile (pprof format), taken after
// a garbage collection.
func (n *Node) HeapProfile(ctx context.Context) ([]byte, error) {
	return n.httpGet(ctx, "/debug/pprof/heap?gc=1")
}

// GoroutineStacks returns the agent's goroutines grouped by stack, with a
// count for each (the goroutine profile in text, debug=1).
func (n *Node) GoroutineStacks(ctx context.Context) (string, error) {
	b, err := n.httpGet(ctx, "/debug/pprof/goroutine?debug=1")
	return string(b), err
}

// httpServing are frames of the goroutines net/http runs for a connection
// to the agent's HTTP server.
var httpServing = []string{"net/http.(*conn).serve", "net/http.(*connReader).backgroundRead"}

// CountGoroutines counts the goroutines of a goroutine profile in text
// (GoroutineStacks) but those serving the HTTP server's connections, the
// reading's own among them, and those with no frame yet. Unlike the
// go_goroutines metric, which counts the goroutines gathering the metrics
// too (a number that varies with the machine's load), the count is the
// same at every reading of an agent doing the same.
func CountGoroutines(profile string) (int, error) {
	groups := strings.Split(strings.TrimSpace(profile), "\n\n")
	header, ok := strings.CutPrefix(groups[0], "goroutine profile: total ")
	if !ok {
		return 0, fmt.Errorf("goroutine profile: no header in %.80q", profile)
	}
	total, rest, _ := strings.Cut(header, "\n")
	want, err := strconv.Atoi(total)
	if err != nil {
		return 0, fmt.Errorf("goroutine profile: total %q: %w", total, err)
	}
	groups[0] = rest
	sum, count := 0, 0
	for _, g := range groups {
		head, frames, _ := strings.Cut(strings.TrimSpace(g), "\n")
		if head == "" {
			continue
		}
		ns, _, ok := strings.Cut(head, " @")
		n, err := strconv.Atoi(ns)
		if !ok || err != nil {
			return 0, fmt.Errorf("goroutine profile: a group starts %.80q", head)
		}
		sum += n
		// A goroutine with no frame of its own is one starting or
		// ending, and waits nowhere (one shows at a reading over
		// HTTP, where a reading in the process has none).
		if strings.TrimSpace(frames) == "" || slices.ContainsFunc(httpServing, func(f string) bool { return strings.Contains(frames, f) }) {
			continue
		}
		count += n
	}
	if sum != want {
		return 0, fmt.Errorf("goroutine profile: groups of %d goroutines, total %d", sum, want)
	}
	return count, nil
}

// AgentLogTail returns the last lines of the agent's log.
func (n *Node) AgentLogTail(lines int) string {
	return tail(filepath.Join(n.LogDir(), "agent.log"), lines)
}

// httpGet fetches path from the agent's HTTP server, connecting from the
// host namespace.
func (n *Node) httpGet(ctx context.Context, path string) ([]byte, error) {
	c := &http.Client{Transport: &http.Transport{
		// A fresh connection per request: no idle connection (and no
		// goroutine of the agent's serving it) outlives the request.
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := n.Host.Do(func(ns.NetNS) error {
				var err error
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+MetricsAddr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("get %s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

// Metrics scrapes the agent's /metrics.
func (n *Node) Metrics(ctx context.Context) (map[string]*dto.MetricFamily, error) {
	b, err := n.httpGet(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parse /metrics: %w", err)
	}
	return mf, nil
}

// Metric returns the sum of every sample of the gauge or counter name
// whose labels include match (nil matches all).
func (n *Node) Metric(ctx context.Context, name string, match map[string]string) (float64, error) {
	mf, err := n.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	return SumMetric(mf, name, match)
}

// SumMetric returns the sum of every sample of the gauge or counter name in
// mf whose labels include match.
func SumMetric(mf map[string]*dto.MetricFamily, name string, match map[string]string) (float64, error) {
	f, ok := mf[name]
	if !ok {
		return 0, fmt.Errorf("metric %s: not exported", name)
	}
	sum := 0.0
next:
	for _, m := range f.GetMetric() {
		labels := make(map[string]string, len(m.GetLabel()))
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range match {
			if labels[k] != v {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		default:
			return 0, fmt.Errorf("metric %s: neither gauge nor counter", name)
		}
	}
	return sum, nil
}

// Attachment is one entry of the agent's /attachments, as far as the tests
// read it.
type Attachment struct {
	ContainerID string       `json:"containerID"`
	IfName      string       `json:"ifName"`
	Kind        string       `json:"kind"`
	Addrs       []netip.Addr `json:"addrs"`
	SocketPath  string       `json:"socketPath"`
	// Up is set while the link is attached to the router.
	Up bool `json:"up"`
	// Bandwidth is the pod's bandwidth limit, nil when it has none.
	Bandwidth *linkspec.Bandwidth `json:"bandwidth"`
}

// Attachments lists the agent's attachments (/attachments).
func (n *Node) Attachments(ctx context.Context) ([]Attachment, error) {
	b, err := n.httpGet(ctx, "/attachments")
	if err != nil {
		return nil, err
	}
	var out []Attachment
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("parse /attachments: %w", err)
	}
	return out, nil
}

// Allocation is one address allocation in the agent's IPAM state.
type Allocation struct {
	ContainerID string       `json:"containerID"`
	IfName      string       `json:"ifName"`
	Addrs       []netip.Addr `json:"addrs"`
}

// Allocations reads the address allocations from the agent's IPAM state
// file (written atomically by the agent, so always whole).
func (n *Node) Allocations() ([]Allocation, error) {
	b, err := os.ReadFile(filepath.Join(n.StateDir(), "ipam", "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ipam state: %w", err)
	}
	var st struct {
		Allocations []Allocation `json:"allocations"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("ipam state: %w", err)
	}
	return st.Allocations, nil
}

// AttachmentRecords returns the names of the agent's attachment records.
func (n *Node) AttachmentRecords() ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(n.StateDir(), "attachments"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("attachment records: %w", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

// tail returns the last lines of a file, or why it cannot.
func tail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// LogsContaining returns the node's log files (agent, CNI plugin,
// sandboxes) that contain s, for example "DATA RACE".
func (n *Node) LogsContaining(s string) ([]string, error) {
	ents, err := os.ReadDir(n.LogDir())
	if err != nil {
		return nil, fmt.Errorf("logs: %w", err)
	}
	var out []string
	for _, e := range ents {
		p := filepath.Join(n.LogDir(), e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("logs: %w", err)
		}
		if bytes.Contains(b, []byte(s)) {
			out = append(out, p)
		}
	}
	return out, nil
}
