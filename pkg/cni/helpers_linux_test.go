package cni

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// binDir holds the binaries the tests build (host-local, shm-cni); TestMain
// removes it.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "shmcni-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// builds holds one *buildState per binary name.
var builds sync.Map

type buildState struct {
	once sync.Once
	path string
	err  error
}

// buildBinary builds a binary into binDir once per test run: pkg is a
// package path, dir the directory to build in (empty: this module).
func buildBinary(t *testing.T, name, dir, pkg string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool to build %s: %v", name, err)
	}
	v, _ := builds.LoadOrStore(name, &buildState{})
	b := v.(*buildState)
	b.once.Do(func() {
		b.path = filepath.Join(binDir, name)
		cmd := exec.Command(goTool, "build", "-o", b.path, pkg)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// hostLocal builds the reference host-local IPAM plugin from the plugins
// module this module requires, and returns the directory holding it.
func hostLocal(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/containernetworking/plugins").Output()
	if err != nil {
		t.Skipf("cannot locate the plugins module: %v", err)
	}
	buildBinary(t, "host-local", strings.TrimSpace(string(out)), "./plugins/ipam/host-local")
	return binDir
}

// shmCNI builds the shm-cni binary and returns the directory holding it.
func shmCNI(t *testing.T) string {
	t.Helper()
	buildBinary(t, "shm-cni", "", "github.com/shm-cni/shm-cni/cmd/shm-cni")
	return binDir
}

// pluginEnv runs the plugin's commands in-process as a runtime would: it
// sets the CNI_* environment (which delegated IPAM plugins inherit) and
// captures the result. Tests using it must not run in parallel.
type pluginEnv struct {
	t       *testing.T
	agent   *fakeAgent
	cniPath string
}

func newPluginEnv(t *testing.T) *pluginEnv {
	testutil.RequireRoot(t)
	return &pluginEnv{t: t, agent: startFakeAgent(t), cniPath: binDir}
}

// conf returns a 1.1.0 plugin config for the fake agent with extra JSON
// members (`"kind":"shm"`) added.
func (e *pluginEnv) conf(extra ...string) []byte {
	members := append([]string{`"cniVersion":"1.1.0"`, `"name":"testnet"`, `"type":"shm-cni"`, `"agentSocket":` + jsonString(e.agent.path)}, extra...)
	return []byte("{" + strings.Join(members, ",") + "}")
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func (e *pluginEnv) setEnv(cmd string, args *skel.CmdArgs) {
	e.t.Setenv("CNI_COMMAND", cmd)
	e.t.Setenv("CNI_CONTAINERID", args.ContainerID)
	e.t.Setenv("CNI_NETNS", args.Netns)
	e.t.Setenv("CNI_IFNAME", args.IfName)
	e.t.Setenv("CNI_ARGS", args.Args)
	e.t.Setenv("CNI_PATH", e.cniPath)
}

func (e *pluginEnv) plugin(stdout *bytes.Buffer) *Plugin {
	return &Plugin{Stdout: stdout, Stderr: e.t.Output()}
}

// add runs ADD and parses its result.
func (e *pluginEnv) add(args *skel.CmdArgs) (*types100.Result, error) {
	e.t.Helper()
	e.setEnv("ADD", args)
	var out bytes.Buffer
	if err := e.plugin(&out).Add(args); err != nil {
		if out.Len() != 0 {
			e.t.Errorf("failed ADD wrote %q to stdout", out.String())
		}
		return nil, err
	}
	r, err := types100.NewResult(out.Bytes())
	if err != nil {
		e.t.Fatalf("ADD result %q: %v", out.String(), err)
	}
	return r.(*types100.Result), nil
}

// mustAdd runs ADD and fails the test on error.
func (e *pluginEnv) mustAdd(args *skel.CmdArgs) *types100.Result {
	e.t.Helper()
	r, err := e.add(args)
	if err != nil {
		e.t.Fatalf("ADD %s: %v", args.ContainerID, err)
	}
	return r
}

func (e *pluginEnv) run(cmd string, args *skel.CmdArgs) error {
	e.t.Helper()
	e.setEnv(cmd, args)
	var out bytes.Buffer
	p := e.plugin(&out)
	var err error
	switch cmd {
	case "DEL":
		err = p.Del(args)
	case "CHECK":
		err = p.Check(args)
	case "STATUS":
		err = p.Status(args)
	case "GC":
		err = p.GC(args)
	default:
		e.t.Fatalf("unknown command %s", cmd)
	}
	if out.Len() != 0 {
		e.t.Errorf("%s wrote %q to stdout", cmd, out.String())
	}
	return err
}

// withPrevResult returns conf with prevResult set to r.
func withPrevResult(t *testing.T, conf []byte, r types.Result) []byte {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(conf, &m); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var prev map[string]any
	if err := json.Unmarshal(b, &prev); err != nil {
		t.Fatal(err)
	}
	m["prevResult"] = prev
	out, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// cniCode returns the CNI code of a command's error (0 for nil).
func cniCode(err error) uint {
	if err == nil {
		return 0
	}
	if te, ok := err.(*types.Error); ok {
		return te.Code
	}
	return 999
}

// podLink is an interface as netlink reports it, read independently of
// the code under test.
type podLink struct {
	Type       string
	Alias      string
	MAC        string
	MTU        int
	GSOMaxSize uint32
	Up         bool
	Addrs      []string
	Routes     []string // "dst via gw scope"
	Neigh      []string // "ip lladdr mac PERMANENT"
}

// readPodLink reads name in netns; ok is false when it does not exist.
func readPodLink(t *testing.T, netns ns.NetNS, name string) (podLink, bool) {
	t.Helper()
	var pl podLink
	found := false
	err := netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(name)
		if _, nf := err.(netlink.LinkNotFoundError); nf {
			return nil
		}
		if err != nil {
			return err
		}
		found = true
		a := l.Attrs()
		pl = podLink{Type: l.Type(), Alias: a.Alias, MAC: a.HardwareAddr.String(), MTU: a.MTU, GSOMaxSize: a.GSOMaxSize, Up: a.Flags&net.FlagUp != 0}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, ad := range addrs {
			if ad.IP.To4() == nil && ad.IP.IsLinkLocalUnicast() {
				continue // the kernel's own fe80:: address
			}
			pl.Addrs = append(pl.Addrs, ad.IPNet.String())
		}
		routes, err := netlink.RouteList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst != nil && r.Dst.IP.To4() == nil && r.Dst.IP.IsLinkLocalUnicast() && r.Gw == nil {
				continue // the kernel's fe80::/64
			}
			if r.Dst != nil && r.Dst.IP.IsMulticast() {
				continue
			}
			pl.Routes = append(pl.Routes, fmt.Sprintf("%s via %s scope %s", r.Dst, r.Gw, r.Scope))
		}
		neighs, err := netlink.NeighList(a.Index, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, n := range neighs {
			if n.State&netlink.NUD_PERMANENT != 0 {
				pl.Neigh = append(pl.Neigh, fmt.Sprintf("%s lladdr %s PERMANENT", n.IP, n.HardwareAddr))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	return pl, found
}

// linkNames lists the interfaces of netns.
func linkNames(t *testing.T, netns ns.NetNS) []string {
	t.Helper()
	var names []string
	err := netns.Do(func(ns.NetNS) error {
		ls, err := netlink.LinkList()
		for _, l := range ls {
			names = append(names, l.Attrs().Name)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// openFDs lists this process's descriptors by what they point at.
func openFDs(t *testing.T) map[string]int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, e := range ents {
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // the directory's own fd, closed by now
		}
		// Sockets and pipes are numbered by inode; count them by kind.
		if strings.HasPrefix(link, "socket:[") || strings.HasPrefix(link, "pipe:[") {
			link = link[:strings.IndexByte(link, '[')]
		}
		out[link]++
	}
	return out
}

// addrOf returns the address of a result's IP.
func addrOf(ip *types100.IPConfig) netip.Prefix {
	p, _ := prefixOf(&ip.Address)
	return p
}
