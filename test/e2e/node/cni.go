package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
)

// Link kinds, as the conflist and SHM_CNI_KIND spell them.
const (
	KindTap  = "tap"
	KindShm  = "shm"
	KindVeth = "veth"
)

const (
	// NetworkName is the conflist's network name.
	NetworkName = "pods"
	// IfName is the pods' interface name.
	IfName = "eth0"
	// PodNamespace is the Kubernetes namespace the pods claim in CNI_ARGS.
	PodNamespace = "e2e"
	// conflistName is the conflist's file name in Dir/net.d.
	conflistName = "10-shm-cni.conflist"
)

// PluginConfig returns the node's shm-cni plugin entry: kind tap by default,
// the node's MTU (PodMTU, else MTU) and agent socket, debug logs to LogDir()/cni.log,
// the bandwidth capability (as deploy/ declares it). Tests edit a copy to
// make bad configs.
func (n *Node) PluginConfig() map[string]any {
	mtu := n.opts.MTU
	if n.opts.PodMTU != 0 {
		mtu = n.opts.PodMTU
	}
	m := map[string]any{
		"type":        "shm-cni",
		"kind":        KindTap,
		"mtu":         mtu,
		"agentSocket": n.SocketPath(),
		"logFile":     filepath.Join(n.LogDir(), "cni.log"),
		"logLevel":    "debug",
	}
	m["capabilities"] = map[string]any{"bandwidth": true}
	return m
}

// Conflist returns a cniVersion 1.1.0 conflist named NetworkName with the
// one plugin entry plugin.
func Conflist(plugin map[string]any) ([]byte, error) {
	return json.MarshalIndent(map[string]any{
		"cniVersion": "1.1.0",
		"name":       NetworkName,
		"plugins":    []any{plugin},
	}, "", "  ")
}

// writeConflist writes the node's conflist to Dir/net.d.
func (n *Node) writeConflist() error {
	b, err := Conflist(n.PluginConfig())
	if err != nil {
		return fmt.Errorf("conflist: %w", err)
	}
	if err := os.WriteFile(n.ConflistPath(), b, 0o600); err != nil {
		return fmt.Errorf("conflist: %w", err)
	}
	return nil
}

// ConflistPath is the node's conflist file.
func (n *Node) ConflistPath() string { return filepath.Join(n.Dir, "net.d", conflistName) }

// NetworkList loads the node's conflist file through libcni, as a runtime
// does.
func (n *Node) NetworkList() (*libcni.NetworkConfigList, error) {
	l, err := libcni.NetworkConfFromFile(n.ConflistPath())
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", n.ConflistPath(), err)
	}
	return l, nil
}

// CNI returns a libcni runtime that finds the plugin in the node's
// binaries and caches results in cacheDir (empty: Dir/cache).
func (n *Node) CNI(cacheDir string) *libcni.CNIConfig {
	if cacheDir == "" {
		cacheDir = filepath.Join(n.Dir, "cache")
	}
	return libcni.NewCNIConfigWithCacheDir([]string{n.opts.Binaries.Dir}, cacheDir, nil)
}

// RuntimeConf is what a Kubernetes runtime passes for pod name's
// interface: CNI_ARGS with the pod's namespace and name and, when kind is
// set, SHM_CNI_KIND.
func RuntimeConf(name, containerID, netnsPath, kind string) *libcni.RuntimeConf {
	args := [][2]string{
		{"IgnoreUnknown", "1"},
		{"K8S_POD_NAMESPACE", PodNamespace},
		{"K8S_POD_NAME", name},
		{"K8S_POD_INFRA_CONTAINER_ID", containerID},
	}
	if kind != "" {
		args = append(args, [2]string{"SHM_CNI_KIND", kind})
	}
	return &libcni.RuntimeConf{ContainerID: containerID, NetNS: netnsPath, IfName: IfName, Args: args}
}

// InHost runs f on a thread in the host namespace: the CNI binary libcni
// forks there runs there, as it does under a runtime on a real node.
func (n *Node) InHost(f func() error) error {
	return n.Host.Do(func(ns.NetNS) error { return f() })
}

// CNIAdd runs ADD through libcni in the host namespace and returns the
// result converted to 1.0.0+ types.
func (n *Node) CNIAdd(ctx context.Context, c *libcni.CNIConfig, l *libcni.NetworkConfigList, rt *libcni.RuntimeConf) (*types100.Result, error) {
	var r types.Result
	err := n.InHost(func() error {
		var err error
		r, err = c.AddNetworkList(ctx, l, rt)
		return err
	})
	if err != nil {
		return nil, err
	}
	res, err := types100.NewResultFromResult(r)
	if err != nil {
		return nil, fmt.Errorf("ADD result: %w", err)
	}
	return res, nil
}

// CNICheck runs CHECK through libcni in the host namespace.
func (n *Node) CNICheck(ctx context.Context, c *libcni.CNIConfig, l *libcni.NetworkConfigList, rt *libcni.RuntimeConf) error {
	return n.InHost(func() error { return c.CheckNetworkList(ctx, l, rt) })
}

// CNIDel runs DEL through libcni in the host namespace.
func (n *Node) CNIDel(ctx context.Context, c *libcni.CNIConfig, l *libcni.NetworkConfigList, rt *libcni.RuntimeConf) error {
	return n.InHost(func() error { return c.DelNetworkList(ctx, l, rt) })
}

// CNIStatus runs STATUS through libcni in the host namespace.
func (n *Node) CNIStatus(ctx context.Context, c *libcni.CNIConfig, l *libcni.NetworkConfigList) error {
	return n.InHost(func() error { return c.GetStatusNetworkList(ctx, l) })
}

// CNIGC runs GC through libcni in the host namespace: libcni first DELs
// every attachment of its cache not in valid, then the plugin's GC gets
// valid.
func (n *Node) CNIGC(ctx context.Context, c *libcni.CNIConfig, l *libcni.NetworkConfigList, valid []types.GCAttachment) error {
	return n.InHost(func() error {
		return c.GCNetworkList(ctx, l, &libcni.GCArgs{ValidAttachments: valid})
	})
}

// ErrorCode returns the CNI error code of an error libcni returned, or 0
// when err carries none.
func ErrorCode(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

// Pod is a pod networked by shm-cni: its namespace, its runtime config and
// its ADD result.
type Pod struct {
	Name string // immutable
	// Kind is KindTap, KindShm or KindVeth. Immutable.
	Kind string
	// NS is the pod's network namespace. Immutable.
	NS ns.NetNS
	// RT is the runtime config of its ADD. Immutable.
	RT *libcni.RuntimeConf
	// Result is the ADD result. Immutable.
	Result *types100.Result
	// Addr4 and Addr6 are its addresses from Result. Immutable.
	Addr4, Addr6 netip.Addr
	// SocketPath is a shm pod's sandbox socket from Result. Immutable.
	SocketPath string

	n *Node // immutable

	// ownNS is set when the pod's netns is the node's to delete: made
	// by AddPod, not given to AddPodIn. Immutable.
	ownNS bool

	// mu guards server.
	mu sync.Mutex
	// server is the sandbox serving on a shm pod's link, if any.
	server *Sandbox
}

// Addr returns the pod's address of a family.
func (p *Pod) Addr(v6 bool) netip.Addr {
	if v6 {
		return p.Addr6
	}
	return p.Addr4
}

// AddPod makes a pod: a fresh netns and a CNI ADD (through libcni with the
// node's conflist and cache) of kind. Close deletes it.
func (n *Node) AddPod(ctx context.Context, name, kind string) (*Pod, error) {
	return n.AddPodWith(ctx, name, kind, nil)
}

// AddPodWith is AddPod with the runtime's capability arguments caps (for
// example {"bandwidth": linkspec.Bandwidth{...}}), passed on its ADD and
// DEL as a runtime passes them for the capabilities the conflist declares.
func (n *Node) AddPodWith(ctx context.Context, name, kind string, caps map[string]any) (*Pod, error) {
	x, err := NewNetNS()
	if err != nil {
		return nil, fmt.Errorf("add pod %s: %w", name, err)
	}
	p, err := n.addPod(ctx, name, kind, x, true, caps)
	if err != nil {
		DeleteNetNS(x)
		return nil, err
	}
	return p, nil
}

// AddPodIn is AddPodWith in an existing netns x, which stays the
// caller's. The container ID is "e2e-" and name.
func (n *Node) AddPodIn(ctx context.Context, name, kind string, x ns.NetNS, caps map[string]any) (*Pod, error) {
	return n.addPod(ctx, name, kind, x, false, caps)
}

func (n *Node) addPod(ctx context.Context, name, kind string, x ns.NetNS, own bool, caps map[string]any) (*Pod, error) {
	p := &Pod{Name: name, Kind: kind, NS: x, n: n, ownNS: own, RT: RuntimeConf(name, "e2e-"+name, x.Path(), kind)}
	p.RT.CapabilityArgs = caps
	l, err := n.NetworkList()
	if err != nil {
		return nil, fmt.Errorf("add pod %s: %w", name, err)
	}
	if p.Result, err = n.CNIAdd(ctx, n.CNI(""), l, p.RT); err != nil {
		return nil, fmt.Errorf("add pod %s: %w", name, err)
	}
	if err := p.parseResult(); err != nil {
		return nil, fmt.Errorf("add pod %s: %w", name, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, fmt.Errorf("add pod %s: node closed", name)
	}
	if _, dup := n.pods[name]; dup {
		return nil, fmt.Errorf("add pod %s: exists", name)
	}
	n.pods[name] = p
	n.log.Debug("pod added", "pod", name, "kind", kind, "addrs", []netip.Addr{p.Addr4, p.Addr6}, "socket", p.SocketPath)
	return p, nil
}

// parseResult fills in the addresses and socket path from the result.
func (p *Pod) parseResult() error {
	for _, ip := range p.Result.IPs {
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			return fmt.Errorf("result: bad address %v", ip.Address)
		}
		a = a.Unmap()
		if a.Is4() {
			p.Addr4 = a
		} else {
			p.Addr6 = a
		}
	}
	if !p.Addr4.IsValid() || !p.Addr6.IsValid() {
		return fmt.Errorf("result: want an IPv4 and an IPv6 address, got %v", p.Result.IPs)
	}
	for _, i := range p.Result.Interfaces {
		if i.SocketPath != "" {
			p.SocketPath = i.SocketPath
		}
	}
	if p.Kind == KindShm && p.SocketPath == "" {
		return errors.New("result: a shm pod's interface has no socketPath")
	}
	return nil
}

// DeletePod stops the pod's sandbox, runs CNI DEL and deletes its netns if
// AddPod made it.
func (n *Node) DeletePod(ctx context.Context, p *Pod) error {
	p.stopServer()
	l, err := n.NetworkList()
	if err != nil {
		return fmt.Errorf("delete pod %s: %w", p.Name, err)
	}
	if err := n.CNIDel(ctx, n.CNI(""), l, p.RT); err != nil {
		return fmt.Errorf("delete pod %s: %w", p.Name, err)
	}
	n.mu.Lock()
	delete(n.pods, p.Name)
	n.mu.Unlock()
	if !p.ownNS {
		return nil
	}
	return DeleteNetNS(p.NS)
}

// RemovePodNetNS deletes p's netns without CNI DEL, as a reboot (or a
// runtime that lost it) would: its devices go with it. DeletePod may follow.
func (n *Node) RemovePodNetNS(p *Pod) error {
	p.stopServer()
	return DeleteNetNS(p.NS)
}
