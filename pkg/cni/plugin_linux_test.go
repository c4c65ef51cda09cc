package cni

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

func cmdArgs(netns ns.NetNS, containerID string, conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: containerID, Netns: netns.Path(), IfName: "eth0", StdinData: conf}
}

// wantResult checks a single-interface ADD result against the fake
// agent's attachment.
func wantResult(t *testing.T, r *types100.Result, netns ns.NetNS, at fakeAttachment, mtu int) {
	t.Helper()
	if len(r.Interfaces) != 1 {
		t.Fatalf("result interfaces = %v, want one", r.Interfaces)
	}
	iface := r.Interfaces[0]
	if iface.Name != "eth0" || iface.Sandbox != netns.Path() || iface.Mtu != mtu {
		t.Errorf("interface = %+v, want eth0 in %s with mtu %d", iface, netns.Path(), mtu)
	}
	var got, want []string
	for _, ip := range r.IPs {
		if ip.Interface == nil || *ip.Interface != 0 {
			t.Errorf("ip %s: interface index %v, want 0", ip.Address.String(), ip.Interface)
		}
		got = append(got, ip.Address.String()+" gw "+ip.Gateway.String())
	}
	for _, c := range at.resp.IPs {
		want = append(want, c.Address+" gw "+c.Gateway)
	}
	if !slices.Equal(got, want) {
		t.Errorf("result ips = %v, want %v", got, want)
	}
	var routes []string
	for _, rt := range r.Routes {
		routes = append(routes, rt.Dst.String()+" via "+rt.GW.String())
	}
	if want := []string{"0.0.0.0/0 via 169.254.1.1", "::/0 via fe80::1"}; !slices.Equal(routes, want) {
		t.Errorf("result routes = %v, want %v", routes, want)
	}
}

// wantNetns checks the pod's interface as netlink reports it.
func wantNetns(t *testing.T, netns ns.NetNS, at fakeAttachment, typ, mac string, mtu int) {
	t.Helper()
	pl, ok := readPodLink(t, netns, "eth0")
	if !ok {
		t.Fatal("eth0 missing from the pod netns")
	}
	if pl.Type != typ || pl.MAC != mac || pl.MTU != mtu || !pl.Up {
		t.Errorf("eth0 = %s mac %s mtu %d up %t, want %s mac %s mtu %d up", pl.Type, pl.MAC, pl.MTU, pl.Up, typ, mac, mtu)
	}
	var wantAddrs []string
	for _, c := range at.resp.IPs {
		wantAddrs = append(wantAddrs, c.Address)
	}
	slices.Sort(pl.Addrs)
	slices.Sort(wantAddrs)
	if !slices.Equal(pl.Addrs, wantAddrs) {
		t.Errorf("addresses = %v, want %v", pl.Addrs, wantAddrs)
	}
	for _, w := range []string{
		"169.254.1.1/32 via <nil> scope link",
		"0.0.0.0/0 via 169.254.1.1 scope universe",
		"::/0 via fe80::1 scope universe",
	} {
		if !slices.Contains(pl.Routes, w) {
			t.Errorf("route %q missing; routes: %v", w, pl.Routes)
		}
	}
	for _, w := range []string{
		"169.254.1.1 lladdr " + fakeGatewayMAC + " PERMANENT",
		"fe80::1 lladdr " + fakeGatewayMAC + " PERMANENT",
	} {
		if !slices.Contains(pl.Neigh, w) {
			t.Errorf("neighbour %q missing; permanent entries: %v", w, pl.Neigh)
		}
	}
}

// TestTapAddCheckDelDel runs ADD, CHECK, DEL, DEL of a tap link: the agent
// gets a TAP fd attached to eth0 in the pod netns, the netns is configured
// from the agent's answer, a packet the pod sends leaves through that fd
// addressed to the gateway MAC, and DEL removes everything, twice.
func TestTapAddCheckDelDel(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	conf := e.conf(`"mtu":1400`)
	args := cmdArgs(netns, "tap-1", conf)
	args.Args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"

	r := e.mustAdd(args)
	at, ok := e.agent.attachment("tap-1", "eth0")
	if !ok {
		t.Fatal("agent has no attachment after ADD")
	}
	if at.req.Kind != KindTap || at.req.Network != "testnet" || at.req.MTU != 1400 || at.req.PodName != "web" || at.req.PodNamespace != "default" || at.req.Queue != nil {
		t.Errorf("attach request = %+v", at.req)
	}
	if len(at.files) != 1 || at.tap.Name != "eth0" || at.tap.TUN || !at.tap.VnetHdr || !at.tap.Persist || !at.tapNetnsMatches {
		t.Errorf("agent got %d fds, tap %+v, in the pod netns: %t; want one TAP fd of a persistent vnet-hdr eth0 in the pod netns", len(at.files), at.tap, at.tapNetnsMatches)
	}
	wantResult(t, r, netns, at, 1400)
	if got := r.Interfaces[0].Mac; got != at.req.MAC {
		t.Errorf("result mac %s, agent was told %s", got, at.req.MAC)
	}
	wantNetns(t, netns, at, "tuntap", at.req.MAC, 1400)
	if pl, _ := readPodLink(t, netns, "eth0"); pl.Alias != "" {
		t.Errorf("tap alias = %q, want none (only a shm placeholder names an attach socket)", pl.Alias)
	} else if pl.GSOMaxSize != linkspec.DefaultShmMTU {
		t.Errorf("tap gso_max_size = %d, want the sandbox links' MTU %d: super-packets that fit them whole", pl.GSOMaxSize, linkspec.DefaultShmMTU)
	}

	// A datagram from the pod to a far address goes out through the TAP
	// to the gateway's MAC, without ARP.
	wantFrameOnTap(t, netns, e.agent, at)

	check := cmdArgs(netns, "tap-1", withPrevResult(t, conf, r))
	if err := e.run("CHECK", check); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	del := cmdArgs(netns, "tap-1", conf)
	for i := range 2 {
		if err := e.run("DEL", del); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	if e.agent.count() != 0 {
		t.Error("agent still has the attachment after DEL")
	}
	if _, ok := readPodLink(t, netns, "eth0"); ok {
		t.Error("eth0 still in the pod netns after DEL")
	}
	if err := e.run("CHECK", check); cniCode(err) != agentapi.CodeLinkSetup {
		t.Errorf("CHECK after DEL = %v, want code %d (interface gone)", err, agentapi.CodeLinkSetup)
	}
}

// wantFrameOnTap sends a UDP datagram from the pod netns to 192.0.2.1
// (TEST-NET-1; the frame never leaves the TAP fd the test reads) and reads
// a duplicate of the agent's TAP fd of at until the frame arrives.
func wantFrameOnTap(t *testing.T, netns ns.NetNS, agent *fakeAgent, at fakeAttachment) {
	t.Helper()
	dup, err := agent.dupFile(at.req.ContainerID, at.req.IfName, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		t.Fatal(err)
	}
	tap := os.NewFile(uintptr(dup), "tap")
	defer tap.Close()
	payload := []byte("shm-cni test datagram")
	err = netns.Do(func(ns.NetNS) error {
		c, err := net.Dial("udp4", "192.0.2.1:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(payload)
		return err
	})
	if err != nil {
		t.Fatalf("send from the pod: %v", err)
	}
	// The deadline only keeps a broken setup from hanging the test.
	tap.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 65536)
	const vnetHdr, eth = 10, 14
	for {
		n, err := tap.Read(buf)
		if err != nil {
			t.Fatalf("no datagram on the TAP fd: %v", err)
		}
		f := buf[vnetHdr:n]
		if len(f) < eth+20+8 || binary.BigEndian.Uint16(f[12:14]) != unix.ETH_P_IP || f[eth+9] != unix.IPPROTO_UDP {
			continue // IPv6 router solicitations, MLD reports and the like
		}
		if got := net.HardwareAddr(f[0:6]).String(); got != fakeGatewayMAC {
			t.Errorf("frame to %s, want the gateway MAC %s", got, fakeGatewayMAC)
		}
		if got := net.HardwareAddr(f[6:12]).String(); got != at.req.MAC {
			t.Errorf("frame from %s, want the pod's MAC %s", got, at.req.MAC)
		}
		src := net.IP(f[eth+12 : eth+16]).String()
		if want := strings.TrimSuffix(at.resp.IPs[0].Address, "/32"); src != want {
			t.Errorf("datagram from %s, want %s", src, want)
		}
		if !strings.Contains(string(f), string(payload)) {
			t.Error("payload missing from the frame")
		}
		return
	}
}

// TestShmAddCheckDelDel runs ADD, CHECK, DEL, DEL of a shm link: the agent
// gets the 10 queue fds (8 sealed memfds, 2 eventfds, in wire order) with
// the configured sizes, the pod netns gets a placeholder dummy carrying the
// agent's MAC and the same addresses, routes and MTU, and the alias naming
// the sandbox socket that the result names too; CHECK notices a changed
// alias.
func TestShmAddCheckDelDel(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	conf := e.conf(`"kind":"shm"`, `"queue":{"dataSize":2097152,"bufferSize":4096}`)
	fdsBefore := openFDs(t)

	r := e.mustAdd(cmdArgs(netns, "shm-1", conf))
	at, ok := e.agent.attachment("shm-1", "eth0")
	if !ok {
		t.Fatal("agent has no attachment after ADD")
	}
	wantSizes := agentapi.QueueSizes{DataSize: 2097152, PipeSize: queue.DefaultPipeSize, BufferSize: 4096}
	if at.req.Kind != KindShm || at.req.Queue == nil || *at.req.Queue != wantSizes || at.req.MAC != "" {
		t.Errorf("attach request = %+v, queue %+v; want kind shm, queue %+v", at.req, at.req.Queue, wantSizes)
	}
	var want []string
	for range 2 {
		want = append(want, "memfd sealed", "eventfd", "memfd sealed", "memfd sealed", "memfd sealed")
	}
	if !slices.Equal(at.fdKinds, want) {
		t.Errorf("agent got fds %v, want %v", at.fdKinds, want)
	}
	wantResult(t, r, netns, at, DefaultMTU)
	iface := r.Interfaces[0]
	if iface.Mac != at.resp.MAC || iface.SocketPath != at.resp.SocketPath || iface.SocketPath == "" {
		t.Errorf("interface mac %s socketPath %q, want %s %q", iface.Mac, iface.SocketPath, at.resp.MAC, at.resp.SocketPath)
	}
	wantNetns(t, netns, at, placeholderType(t), at.resp.MAC, DefaultMTU)
	if pl, _ := readPodLink(t, netns, "eth0"); pl.Alias != "sharedmem:"+at.resp.SocketPath {
		t.Errorf("placeholder alias = %q, want %q", pl.Alias, "sharedmem:"+at.resp.SocketPath)
	}

	// The plugin closed its copies of the queue fds: only the agent's
	// remain open in this process.
	memfds, eventfds := 0, 0
	for k, n := range openFDs(t) {
		switch {
		case strings.HasPrefix(k, "/memfd:"):
			memfds += n - fdsBefore[k]
		case k == "anon_inode:[eventfd]":
			eventfds += n - fdsBefore[k]
		}
	}
	if memfds != 8 || eventfds != 2 {
		t.Errorf("%d memfds and %d eventfds more than before ADD, want the agent's 8 and 2", memfds, eventfds)
	}

	check := cmdArgs(netns, "shm-1", withPrevResult(t, conf, r))
	if err := e.run("CHECK", check); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	setAlias := func(alias string) {
		t.Helper()
		if err := netns.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			return netlink.LinkSetAlias(l, alias)
		}); err != nil {
			t.Fatal(err)
		}
	}
	setAlias("sharedmem:/elsewhere.sock")
	if err := e.run("CHECK", check); cniCode(err) != agentapi.CodeCheckFailed || !strings.Contains(err.Error(), `alias is "sharedmem:/elsewhere.sock"`) {
		t.Errorf("CHECK with a changed alias = %v, want code %d naming the alias", err, agentapi.CodeCheckFailed)
	}
	setAlias("sharedmem:" + at.resp.SocketPath)
	if err := e.run("CHECK", check); err != nil {
		t.Fatalf("CHECK after restoring the alias: %v", err)
	}
	for i := range 2 {
		if err := e.run("DEL", cmdArgs(netns, "shm-1", conf)); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	if e.agent.count() != 0 {
		t.Error("agent still has the attachment after DEL")
	}
	if _, ok := readPodLink(t, netns, "eth0"); ok {
		t.Error("eth0 still in the pod netns after DEL")
	}
}

// placeholderType is the link type of a shm link's placeholder: dummy,
// or tuntap on kernels without dummy devices.
func placeholderType(t *testing.T) string {
	t.Helper()
	netns := testutil.NewNS(t)
	err := netns.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}})
	})
	if errors.Is(err, unix.EOPNOTSUPP) {
		t.Log("the kernel has no dummy devices: expecting a TAP placeholder")
		return "tuntap"
	}
	if err != nil {
		t.Fatal(err)
	}
	return "dummy"
}

// TestCheckDetectsDrift checks that CHECK fails, naming the difference,
// when the interface was changed behind the plugin's back or the agent
// lost the attachment.
func TestCheckDetectsDrift(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	conf := e.conf()
	r := e.mustAdd(cmdArgs(netns, "drift", conf))
	t.Cleanup(func() { e.run("DEL", cmdArgs(netns, "drift", conf)) })
	check := cmdArgs(netns, "drift", withPrevResult(t, conf, r))

	err := netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.LinkSetMTU(l, 1280)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.run("CHECK", check); cniCode(err) != agentapi.CodeCheckFailed || !strings.Contains(err.Error(), "mtu is 1280, want 1500") {
		t.Errorf("CHECK with a changed MTU = %v, want code %d naming the mtu", err, agentapi.CodeCheckFailed)
	}
	netns.Do(func(ns.NetNS) error {
		l, _ := netlink.LinkByName("eth0")
		return netlink.LinkSetMTU(l, 1500)
	})
	if err := e.run("CHECK", check); err != nil {
		t.Fatalf("CHECK after restoring the MTU: %v", err)
	}
	e.agent.forget("drift", "eth0")
	if err := e.run("CHECK", check); cniCode(err) != agentapi.CodeNoSuchAttachment {
		t.Errorf("CHECK without the agent's attachment = %v, want code %d", err, agentapi.CodeNoSuchAttachment)
	}
	if err := e.run("CHECK", cmdArgs(netns, "drift", conf)); cniCode(err) != agentapi.CodeInvalidConfig || !strings.Contains(err.Error(), "prevResult") {
		t.Errorf("CHECK without prevResult = %v, want code %d naming prevResult", err, agentapi.CodeInvalidConfig)
	}
}

// TestDelNetnsGone checks that DEL succeeds, and detaches, when the pod's
// netns no longer exists, and when CNI_NETNS is empty.
func TestDelNetnsGone(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	conf := e.conf()
	args := cmdArgs(netns, "gone", conf)
	e.mustAdd(args)
	netns.Close() // an open handle keeps the mount busy
	if err := testutils.UnmountNS(netns); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(args.Netns); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("netns path still there: %v", err)
	}
	if err := e.run("DEL", args); err != nil {
		t.Fatalf("DEL with the netns gone: %v", err)
	}
	if e.agent.count() != 0 {
		t.Error("agent still has the attachment")
	}
	args.Netns = ""
	if err := e.run("DEL", args); err != nil {
		t.Fatalf("DEL without CNI_NETNS: %v", err)
	}
}

// TestNoAgent checks the agent being down: ADD fails with code 11 and
// leaves nothing in the netns, STATUS is 50, and DEL still cleans the
// netns and succeeds.
func TestNoAgent(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	conf := e.conf()
	args := cmdArgs(netns, "down", conf)
	e.mustAdd(args)
	e.agent.stop()

	if err := e.run("STATUS", &skel.CmdArgs{StdinData: conf}); cniCode(err) != agentapi.CodeNotAvailable {
		t.Errorf("STATUS with the agent down = %v, want code %d", err, agentapi.CodeNotAvailable)
	}
	if err := e.run("DEL", args); err != nil {
		t.Fatalf("DEL with the agent down: %v", err)
	}
	if _, ok := readPodLink(t, netns, "eth0"); ok {
		t.Error("DEL left eth0 in the pod netns")
	}
	for _, kind := range []string{KindTap, KindShm} {
		_, err := e.add(cmdArgs(netns, "down-"+kind, e.conf(`"kind":"`+kind+`"`)))
		if cniCode(err) != agentapi.CodeTryAgainLater {
			t.Errorf("%s ADD with the agent down = %v, want code %d", kind, err, agentapi.CodeTryAgainLater)
		}
		if names := linkNames(t, netns); !slices.Equal(names, []string{"lo"}) {
			t.Errorf("%s ADD with the agent down left interfaces %v", kind, names)
		}
	}
}

// TestStatus checks STATUS against a ready and an unready agent.
func TestStatus(t *testing.T) {
	e := newPluginEnv(t)
	args := &skel.CmdArgs{StdinData: e.conf()}
	if err := e.run("STATUS", args); err != nil {
		t.Fatalf("STATUS, agent ready: %v", err)
	}
	e.agent.setNotReady("uplink shm0 missing")
	if err := e.run("STATUS", args); cniCode(err) != agentapi.CodeNotAvailable || !strings.Contains(err.Error(), "uplink shm0 missing") {
		t.Errorf("STATUS, agent not ready = %v, want code %d with the agent's reason", err, agentapi.CodeNotAvailable)
	}
}

// TestRollback checks that a failed ADD undoes everything: the TAP or
// dummy, the agent attachment, the delegated IPAM reservation (host-local,
// built from the plugins module) and the queue fds.
func TestRollback(t *testing.T) {
	e := newPluginEnv(t)
	e.cniPath = hostLocal(t)
	for _, tc := range []struct {
		name string
		kind string
		// agentErr makes the agent fail the attach; mangle makes it
		// answer unusably, a failure after the attach, which the
		// rollback must detach.
		agentErr error
		mangle   bool
		code     uint
	}{
		{"tap agent error", KindTap, agentapi.NewError(agentapi.CodeAttachFailed, "attach failed", "test"), false, agentapi.CodeAttachFailed},
		{"shm agent error", KindShm, agentapi.NewError(agentapi.CodeAttachFailed, "attach failed", "test"), false, agentapi.CodeAttachFailed},
		{"tap bad answer", KindTap, nil, true, agentapi.CodeBadAgentAnswer},
		{"shm bad answer", KindShm, nil, true, agentapi.CodeBadAgentAnswer},
	} {
		t.Run(tc.name, func(t *testing.T) {
			netns := testutil.NewNS(t)
			dataDir := t.TempDir()
			conf := e.conf(`"kind":"`+tc.kind+`"`, `"ipam":{"type":"host-local","dataDir":`+jsonString(dataDir)+`,"ranges":[[{"subnet":"10.77.0.0/24"}]]}`)
			fdsBefore := openFDs(t)
			e.agent.setFailAttach(tc.agentErr)
			if tc.mangle {
				e.agent.setMangle(func(r *agentapi.AttachResponse) { r.GatewayMAC = "ff:ff:ff:ff:ff:ff" })
			}
			t.Cleanup(func() { e.agent.setFailAttach(nil); e.agent.setMangle(nil) })

			_, err := e.add(cmdArgs(netns, "rollback", conf))
			if cniCode(err) != tc.code {
				t.Fatalf("ADD = %v, want code %d", err, tc.code)
			}
			if names := linkNames(t, netns); !slices.Equal(names, []string{"lo"}) {
				t.Errorf("failed ADD left interfaces %v", names)
			}
			if n := e.agent.count(); n != 0 {
				t.Errorf("failed ADD left %d agent attachments", n)
			}
			if tc.mangle && e.agent.opCount(agentapi.OpDetach) == 0 {
				t.Error("failed ADD did not detach")
			}
			reserved, _ := filepath.Glob(filepath.Join(dataDir, "testnet", "10.77.0.*"))
			if len(reserved) != 0 {
				t.Errorf("host-local reservations left: %v", reserved)
			}
			if got := openFDs(t); !sameFDs(fdsBefore, got, true) {
				t.Errorf("fds before %v, after %v", fdsBefore, got)
			}
		})
	}
}

// sameFDs compares fd counts by kind. It ignores the pipes and pidfds of
// IPAM plugin runs and, with ignoreSockets, sockets: the fake agent closes
// its end of a connection after answering, possibly after the plugin
// returned.
func sameFDs(a, b map[string]int, ignoreSockets bool) bool {
	for _, m := range []map[string]int{a, b} {
		for k := range m {
			if a[k] == b[k] || k == "pipe:" || k == "anon_inode:[pidfd]" || ignoreSockets && k == "socket:" {
				continue
			}
			return false
		}
	}
	return true
}

// TestIPAMDelegation checks ADD, CHECK and DEL with host-local: its
// address goes to the agent and into the pod, and DEL releases it.
func TestIPAMDelegation(t *testing.T) {
	e := newPluginEnv(t)
	e.cniPath = hostLocal(t)
	netns := testutil.NewNS(t)
	dataDir := t.TempDir()
	conf := e.conf(`"ipam":{"type":"host-local","dataDir":` + jsonString(dataDir) + `,"ranges":[[{"subnet":"10.77.0.0/24"}]]}`)
	r := e.mustAdd(cmdArgs(netns, "ipam-1", conf))
	at, _ := e.agent.attachment("ipam-1", "eth0")
	if len(at.req.IPs) != 1 || !strings.HasPrefix(at.req.IPs[0], "10.77.0.") || !strings.HasSuffix(at.req.IPs[0], "/24") {
		t.Fatalf("agent got ips %v, want host-local's 10.77.0.x/24", at.req.IPs)
	}
	ip := strings.TrimSuffix(at.req.IPs[0], "/24")
	if len(r.IPs) != 1 || r.IPs[0].Address.String() != ip+"/32" {
		t.Errorf("result ips %v, want %s/32", r.IPs, ip)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "testnet", ip)); err != nil {
		t.Errorf("host-local reservation: %v", err)
	}
	if err := e.run("CHECK", cmdArgs(netns, "ipam-1", withPrevResult(t, conf, r))); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	if err := e.run("DEL", cmdArgs(netns, "ipam-1", conf)); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "testnet", ip)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("host-local reservation after DEL: %v", err)
	}
}

// TestAddInterfaceExists checks that ADD fails when CNI_IFNAME exists and
// leaves that interface alone, and that DEL leaves alone an interface that
// is not of a kind shm-cni creates.
func TestAddInterfaceExists(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	err := netns.Do(func(ns.NetNS) error {
		// A bridge: not a kind shm-cni creates, and present in every
		// kernel a container host runs.
		return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1234}})
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{KindTap, KindShm} {
		_, err := e.add(cmdArgs(netns, "exists", e.conf(`"kind":"`+kind+`"`)))
		if cniCode(err) != agentapi.CodeInterfaceExists || !strings.Contains(err.Error(), "CNI_IFNAME") {
			t.Errorf("%s ADD over an existing eth0 = %v, want code %d naming CNI_IFNAME", kind, err, agentapi.CodeInterfaceExists)
		}
		if pl, ok := readPodLink(t, netns, "eth0"); !ok || pl.MTU != 1234 {
			t.Errorf("existing eth0 changed: %+v %t", pl, ok)
		}
	}
	if e.agent.opCount(agentapi.OpAttach) != 0 {
		t.Error("the agent was asked to attach")
	}
	if err := e.run("DEL", cmdArgs(netns, "exists", e.conf())); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, ok := readPodLink(t, netns, "eth0"); !ok {
		t.Error("DEL deleted a bridge it did not create")
	}
}

// TestChained checks that ADD passes a previous plugin's result through and
// adds its interface after it.
func TestChained(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	prev := &types100.Result{
		CNIVersion: "1.1.0",
		Interfaces: []*types100.Interface{{Name: "other0", Sandbox: netns.Path()}},
	}
	conf := withPrevResult(t, e.conf(), prev)
	r := e.mustAdd(cmdArgs(netns, "chained", conf))
	t.Cleanup(func() { e.run("DEL", cmdArgs(netns, "chained", conf)) })
	if len(r.Interfaces) != 2 || r.Interfaces[0].Name != "other0" || r.Interfaces[1].Name != "eth0" {
		t.Fatalf("interfaces = %v, want other0 then eth0", r.Interfaces)
	}
	for _, ip := range r.IPs {
		if *ip.Interface != 1 {
			t.Errorf("ip %s on interface %d, want 1", ip.Address.String(), *ip.Interface)
		}
	}
}

// TestGC checks that GC sends the valid attachments and the agent releases
// the rest.
func TestGC(t *testing.T) {
	e := newPluginEnv(t)
	conf := e.conf()
	keep, drop := testutil.NewNS(t), testutil.NewNS(t)
	e.mustAdd(cmdArgs(keep, "keep", conf))
	e.mustAdd(cmdArgs(drop, "drop", conf))
	t.Cleanup(func() {
		e.run("DEL", cmdArgs(keep, "keep", conf))
		e.run("DEL", cmdArgs(drop, "drop", conf))
	})
	gc := e.conf(`"cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]`)
	if err := e.run("GC", &skel.CmdArgs{StdinData: gc}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if _, ok := e.agent.attachment("keep", "eth0"); !ok {
		t.Error("GC released a valid attachment")
	}
	if _, ok := e.agent.attachment("drop", "eth0"); ok {
		t.Error("GC kept an attachment not in the valid list")
	}
	e.agent.stop()
	if err := e.run("GC", &skel.CmdArgs{StdinData: gc}); cniCode(err) != agentapi.CodeTryAgainLater {
		t.Errorf("GC with the agent down = %v, want code %d", err, agentapi.CodeTryAgainLater)
	}
}

// TestAddDelLoopNoLeak runs 50 ADD/DEL cycles, alternating tap and shm,
// and checks that no descriptor, interface or attachment is left.
func TestAddDelLoopNoLeak(t *testing.T) {
	e := newPluginEnv(t)
	netns := testutil.NewNS(t)
	confs := map[string][]byte{KindTap: e.conf(), KindShm: e.conf(`"kind":"shm"`)}
	cycle := func(i int) {
		kind := KindTap
		if i%2 == 1 {
			kind = KindShm
		}
		args := cmdArgs(netns, fmt.Sprintf("loop-%d", i), confs[kind])
		e.mustAdd(args)
		if err := e.run("DEL", args); err != nil {
			t.Fatalf("cycle %d DEL: %v", i, err)
		}
	}
	// Warm up: the runtime's poller and netlink's first use open fds
	// that stay. Then stop that agent, so that every connection it
	// served is closed, and count with a fresh one.
	cycle(0)
	cycle(1)
	e.agent.stop()
	hostBefore := hostLinks(t)
	fdsBefore := openFDs(t)
	e.agent = startFakeAgent(t)
	confs = map[string][]byte{KindTap: e.conf(), KindShm: e.conf(`"kind":"shm"`)}
	for i := range 50 {
		cycle(i)
	}
	if n := e.agent.count(); n != 0 {
		t.Errorf("agent holds %d attachments after 50 cycles", n)
	}
	if e.agent.opCount(agentapi.OpAttach) != 50 || e.agent.opCount(agentapi.OpDetach) != 50 {
		t.Errorf("agent saw %d attaches and %d detaches, want 50 each", e.agent.opCount(agentapi.OpAttach), e.agent.opCount(agentapi.OpDetach))
	}
	e.agent.stop()
	if got := openFDs(t); !sameFDs(fdsBefore, got, false) {
		t.Errorf("fds before %v, after 50 cycles %v", fdsBefore, got)
	}
	if names := linkNames(t, netns); !slices.Equal(names, []string{"lo"}) {
		t.Errorf("pod netns interfaces after 50 cycles: %v", names)
	}
	if got := hostLinks(t); slices.Contains(got, "eth0") && !slices.Contains(hostBefore, "eth0") {
		t.Errorf("an eth0 appeared in the test's own netns: %v", got)
	}
}

// hostLinks lists the interfaces of the test's own netns.
func hostLinks(t *testing.T) []string {
	t.Helper()
	ls, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range ls {
		names = append(names, l.Attrs().Name)
	}
	slices.Sort(names)
	return names
}

// TestIPAMDelegationDeadline: a delegated IPAM plugin that never answers
// is killed at the command's deadline (Plugin.Timeout): ADD fails naming
// the plugin and leaves nothing behind (no attachment, no interface, the
// plugin's process gone: it is the sleep itself). Without the deadline ADD
// would wait for the plugin as long as it runs.
func TestIPAMDelegationDeadline(t *testing.T) {
	e := newPluginEnv(t)
	e.cniPath = t.TempDir()
	if err := os.WriteFile(filepath.Join(e.cniPath, "hang-ipam"), []byte("#!/bin/sh\nexec sleep 3600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	netns := testutil.NewNS(t)
	args := cmdArgs(netns, "ipam-hang", e.conf(`"ipam":{"type":"hang-ipam"}`))
	e.setEnv("ADD", args)
	var out bytes.Buffer
	p := &Plugin{Stdout: &out, Stderr: t.Output(), Timeout: time.Second}
	err := p.Add(args)
	if err == nil || !strings.Contains(err.Error(), "ipam hang-ipam ADD") {
		t.Fatalf("ADD with an IPAM plugin that never answers: %v, want an error naming it", err)
	}
	if n := e.agent.count(); n != 0 {
		t.Errorf("%d attachments left", n)
	}
	testutil.Do(t, netns, func() error {
		if _, err := netlink.LinkByName("eth0"); err == nil {
			t.Error("eth0 left in the pod's netns")
		}
		return nil
	})
}
