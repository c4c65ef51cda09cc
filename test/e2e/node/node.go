package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/pkg/router"
)

// The node's addressing.
var (
	// PodCIDR4 and PodCIDR6 are the node's pod CIDRs (dual stack).
	PodCIDR4 = netip.MustParsePrefix("10.244.0.0/24")
	PodCIDR6 = netip.MustParsePrefix("fd00:10:244::/64")
	// HostOutside4 and HostOutside6 are the host's addresses on the
	// veth to the outside: what the outside sees of masqueraded pods.
	HostOutside4 = netip.MustParsePrefix("192.0.2.1/24")
	HostOutside6 = netip.MustParsePrefix("2001:db8:2::1/64")
	// Outside4 and Outside6 are the outside namespace's addresses.
	Outside4 = netip.MustParsePrefix("192.0.2.2/24")
	Outside6 = netip.MustParsePrefix("2001:db8:2::2/64")
)

// closeGrace is how long Close gives the sandbox programs to exit after
// SIGTERM before it kills them.
const closeGrace = time.Second

// Interface names in the host and outside namespaces.
const (
	// Uplink is the agent's TUN device in the host namespace.
	Uplink = "shm0"
	// HostOutsideVeth is the host's end of the veth to the outside.
	HostOutsideVeth = "out0"
	hostVeth        = HostOutsideVeth
	// outsideVeth is the outside's end.
	outsideVeth = "eth0"
)

// Options configure a Node.
type Options struct {
	// Binaries are the programs to run (see Build). Required.
	Binaries Binaries
	// Logger receives the harness's progress; nil discards it.
	Logger *slog.Logger
	// PodCIDRs are the node's pod CIDRs, one IPv4 and one IPv6 prefix,
	// in that order; nil means PodCIDR4 and PodCIDR6.
	PodCIDRs []netip.Prefix
	// MTU is the agent's --mtu and the conflist's mtu: kernel pods' links
	// and the uplink; 0 means 1500.
	MTU int
	// ShmMTU is the agent's --shm-mtu, the MTU of sandbox links; 0 leaves
	// the agent's default.
	ShmMTU int
	// PodMTU is the conflist's mtu, the MTU of kernel pods' links, when
	// it differs from MTU (the uplink's); 0 means MTU.
	PodMTU int
	// NoMasquerade runs the agent with --masquerade=false.
	NoMasquerade bool
	// AgentLogLevel is the agent's --log-level; empty means info.
	AgentLogLevel string
	// ExtraAgentArgs are appended to the agent's flags.
	ExtraAgentArgs []string
	// AgentEnv is added to the agent's environment (the test's).
	AgentEnv []string
	// SandboxEnv is added to the environment of the sandbox programs
	// StartSandbox runs (the test's).
	SandboxEnv []string
	// NoVerify makes Transfer count bytes instead of checking them, and
	// send zeros instead of the pattern: for benchmarks, which measure the
	// path, not the tool. Tests verify.
	NoVerify bool
	// DeferAgent leaves the agent to the caller's StartAgent, for setup
	// the agent needs first (a link to another node).
	DeferAgent bool
}

// Node is a node in a box. Its methods may be called from any goroutine.
//
// LOCK ORDERING: Pod.mu > Node.mu.
type Node struct {
	opts Options      // immutable
	log  *slog.Logger // immutable
	// Dir is the node's scratch directory: agent socket, state, sandbox
	// sockets, conflist, libcni cache and logs. Immutable.
	Dir string
	// Host is the node's host network namespace; Outside the world
	// beyond it. Immutable.
	Host, Outside ns.NetNS
	// Gateway4 and Gateway6 are the node gateway addresses the agent puts
	// on its uplink in the host: the host's source address toward pods,
	// and where pods reach the host. Immutable.
	Gateway4, Gateway6 netip.Addr

	// mu guards the fields below.
	mu sync.Mutex
	// agent is the running agent process, nil when stopped.
	agent *Agent
	// pods are the pods AddPod made and DeletePod did not delete.
	pods map[string]*Pod
	// netns are namespaces made with NewPodNetNS, deleted by Close.
	netns []ns.NetNS
	// sandboxes are every sandbox started, killed by Close if still
	// running.
	sandboxes []*Sandbox
	// endedSandboxCPU is the CPU time of the sandboxes forgotten from
	// sandboxes.
	endedSandboxCPU time.Duration
	// closed is set by Close.
	closed bool
}

// New builds the node: host and outside namespaces joined by a veth, IP
// forwarding on in the host namespace only, and a running, ready agent
// (unless Options.DeferAgent).
// On error everything made is released; otherwise call Close.
func New(ctx context.Context, opts Options) (n *Node, err error) {
	if opts.Binaries.Agent == "" {
		return nil, errors.New("new node: no binaries")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.MTU == 0 {
		opts.MTU = 1500
	}
	if opts.PodCIDRs == nil {
		opts.PodCIDRs = []netip.Prefix{PodCIDR4, PodCIDR6}
	}
	if len(opts.PodCIDRs) != 2 || !opts.PodCIDRs[0].Addr().Is4() || !opts.PodCIDRs[1].Addr().Is6() {
		return nil, fmt.Errorf("new node: pod CIDRs %v: want an IPv4 and an IPv6 prefix", opts.PodCIDRs)
	}
	gw4, err := router.NodeGateway(opts.PodCIDRs[0])
	if err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	gw6, err := router.NodeGateway(opts.PodCIDRs[1])
	if err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	// Short: the agent's per-link sockets must fit sun_path (107 bytes)
	// with a 64-byte container ID in their name.
	dir, err := os.MkdirTemp("", "e2e")
	if err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	made := &Node{opts: opts, log: opts.Logger, Dir: dir, Gateway4: gw4, Gateway6: gw6, pods: make(map[string]*Pod)}
	n = made
	defer func() {
		// Every error return sets n to nil first: close what was made.
		if err != nil {
			made.Close()
			n = nil
		}
	}()
	for _, d := range []string{"state", "sb", "net.d", "cache", "logs"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("new node: %w", err)
		}
	}
	if n.Host, err = NewNetNS(); err != nil {
		return nil, fmt.Errorf("new node: host: %w", err)
	}
	if n.Outside, err = NewNetNS(); err != nil {
		return nil, fmt.Errorf("new node: outside: %w", err)
	}
	if err := connectOutside(n.Host, n.Outside, hostVeth, outsideVeth,
		[]netip.Prefix{HostOutside4, HostOutside6}, []netip.Prefix{Outside4, Outside6}); err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	// The host routes between its uplink and the outside; nothing else
	// on the machine changes.
	for _, kv := range [][2]string{{"net.ipv4.ip_forward", "1"}, {"net.ipv6.conf.all.forwarding", "1"}} {
		if err := Sysctl(n.Host, kv[0], kv[1]); err != nil {
			return nil, fmt.Errorf("new node: %w", err)
		}
	}
	if err := n.writeConflist(); err != nil {
		return nil, fmt.Errorf("new node: %w", err)
	}
	if !opts.DeferAgent {
		if err := n.StartAgent(ctx); err != nil {
			return nil, fmt.Errorf("new node: %w", err)
		}
	}
	n.log.Debug("node up", "dir", dir, "host", n.Host.Path(), "outside", n.Outside.Path())
	return n, nil
}

// Close stops every sandbox and the agent (by their pids), deletes every
// namespace the node made and removes its directory. It runs no CNI DEL:
// the namespaces and the agent take every pod resource with them. It is
// idempotent and returns every error it met.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	pods := make([]*Pod, 0, len(n.pods))
	for _, p := range n.pods {
		pods = append(pods, p)
	}
	n.pods = nil
	extra := n.netns
	n.netns = nil
	a := n.agent
	n.agent = nil
	sandboxes := n.sandboxes
	n.sandboxes = nil
	n.mu.Unlock()

	var errs []error
	for _, p := range pods {
		p.stopServer()
	}
	// SIGTERM first, so that a sandbox program ends as it would in a
	// pod (and writes its profile, see the sandbox command); a second
	// later, those still running are killed.
	var wg sync.WaitGroup
	for _, s := range sandboxes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.proc.stopWithin(closeGrace)
		}()
	}
	wg.Wait()
	if a != nil {
		a.proc.kill()
	}
	for _, p := range pods {
		if p.ownNS {
			errs = append(errs, DeleteNetNS(p.NS))
		}
	}
	for _, x := range extra {
		errs = append(errs, DeleteNetNS(x))
	}
	errs = append(errs, DeleteNetNS(n.Outside), DeleteNetNS(n.Host))
	if n.Dir != "" {
		errs = append(errs, os.RemoveAll(n.Dir))
	}
	return errors.Join(errs...)
}

// NewPodNetNS makes a fresh network namespace that Close deletes (unless
// the caller deleted it with DeleteNetNS before).
func (n *Node) NewPodNetNS() (ns.NetNS, error) {
	x, err := NewNetNS()
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		DeleteNetNS(x)
		return nil, errors.New("node closed")
	}
	n.netns = append(n.netns, x)
	return x, nil
}

// Gateway returns the node gateway address of a family.
func (n *Node) Gateway(v6 bool) netip.Addr {
	if v6 {
		return n.Gateway6
	}
	return n.Gateway4
}

// PodCIDRs returns the node's pod CIDRs, IPv4 then IPv6.
func (n *Node) PodCIDRs() []netip.Prefix { return n.opts.PodCIDRs }

// StateDir is the agent's --state-dir.
func (n *Node) StateDir() string { return filepath.Join(n.Dir, "state") }

// SandboxDir is the agent's --sandbox-dir.
func (n *Node) SandboxDir() string { return filepath.Join(n.Dir, "sb") }

// SocketPath is the agent's --socket.
func (n *Node) SocketPath() string { return filepath.Join(n.Dir, "agent.sock") }

// LogDir holds the agent's, the CNI plugin's and the sandboxes' logs.
func (n *Node) LogDir() string { return filepath.Join(n.Dir, "logs") }
