package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// transferSize is the size of the large TCP transfers: 10 MiB.
const transferSize = 10 << 20

// TestTapPodTraffic: two tap pods attached through the agent exchange
// 10 MiB of verified TCP over IPv4 and 1 MiB over IPv6, each seeing the
// other's address; the host reaches a pod and a pod the host.
func TestTapPodTraffic(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	a := r.newTapPod(t, "pod-a", true)
	b := r.newTapPod(t, "pod-b", false)

	if got := a.resp.GatewayMAC; got != "ee:ee:ee:ee:ee:ee" {
		t.Errorf("gateway MAC %q, want ee:ee:ee:ee:ee:ee", got)
	}
	if len(a.addrs) != 2 || a.addrs[0] == b.addrs[0] || a.addrs[1] == b.addrs[1] {
		t.Fatalf("pod addresses %v and %v: want one IPv4 and one IPv6 each, distinct", a.addrs, b.addrs)
	}
	for _, tc := range []struct {
		v4 bool
		n  int64
	}{{true, transferSize}, {false, 1 << 20}} {
		ln := listenIn(t, b.ns, b.addr(tc.v4))
		dst := netip.MustParseAddrPort(ln.Addr().String())
		if got := transfer(t, ln, func() (net.Conn, error) { return dialFrom(a.ns, dst) }, tc.n); got != a.addr(tc.v4) {
			t.Errorf("pod b saw client %s, want pod a's %s", got, a.addr(tc.v4))
		}
	}
	// Host to pod (kubelet probes) and pod to host (the node gateway).
	ln := listenIn(t, a.ns, a.addr(true))
	dst := netip.MustParseAddrPort(ln.Addr().String())
	transfer(t, ln, func() (net.Conn, error) { return dialFrom(e.host, dst) }, 1<<20)
	gw, _ := router.NodeGateway(podCIDR4)
	hl := listenIn(t, e.host, gw)
	hdst := netip.MustParseAddrPort(hl.Addr().String())
	if got := transfer(t, hl, func() (net.Conn, error) { return dialFrom(b.ns, hdst) }, 1<<20); got != b.addr(true) {
		t.Errorf("host saw client %s, want pod b's %s", got, b.addr(true))
	}
}

// TestSandboxTraffic: a sandbox netstack on a dialled shm link exchanges
// verified TCP with a tap pod in both directions and over both families,
// and the host reaches the sandbox.
func TestSandboxTraffic(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	p := r.newTapPod(t, "pod-k", true)
	resp := r.attachShm(t, "sandbox-1")
	if want := filepath.Join(r.cfg.SandboxDir, "sandbox-1-eth0.sock"); resp.SocketPath != want {
		t.Errorf("socket path %q, want %q", resp.SocketPath, want)
	}
	if fi, err := os.Stat(resp.SocketPath); err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("socket %s: %v, %v: want a socket of mode 0600", resp.SocketPath, fi.Mode(), err)
	}
	sb, err := dialSandbox(t, resp.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	if sb.cfg.MAC != resp.MAC || sb.cfg.GatewayMAC != resp.GatewayMAC {
		t.Errorf("link config MACs %s/%s, attach answered %s/%s", sb.cfg.MAC, sb.cfg.GatewayMAC, resp.MAC, resp.GatewayMAC)
	}
	// The sandbox link's large MTU (the tap pod's is 1500): TCP's MSS keeps
	// the transfers below to what each link carries.
	if resp.MTU != DefaultShmMTU || sb.cfg.MTU != DefaultShmMTU || sb.ep.MTU() != DefaultShmMTU {
		t.Errorf("MTU: attach answered %d, link config %d, endpoint %d; want %d", resp.MTU, sb.cfg.MTU, sb.ep.MTU(), DefaultShmMTU)
	}

	// Sandbox to pod, 10 MiB over IPv4, 1 MiB over IPv6.
	for _, tc := range []struct {
		v4 bool
		n  int64
	}{{true, transferSize}, {false, 1 << 20}} {
		ln := listenIn(t, p.ns, p.addr(tc.v4))
		dst := netip.MustParseAddrPort(ln.Addr().String())
		if got := transfer(t, ln, func() (net.Conn, error) { return sb.dial(dst) }, tc.n); got != sb.addr(tc.v4) {
			t.Errorf("pod saw client %s, want the sandbox's %s", got, sb.addr(tc.v4))
		}
	}
	// Pod to sandbox, and host to sandbox.
	sln := sb.listen(t, sb.addr(true), 7000)
	sdst := netip.AddrPortFrom(sb.addr(true), 7000)
	if got := transfer(t, sln, func() (net.Conn, error) { return dialFrom(p.ns, sdst) }, transferSize); got != p.addr(true) {
		t.Errorf("sandbox saw client %s, want the pod's %s", got, p.addr(true))
	}
	transfer(t, sln, func() (net.Conn, error) { return dialFrom(e.host, sdst) }, 1<<20)
}

// TestShmMTU: a sandbox link's MTU is the attach's, else --shm-mtu bounded
// by what the link's queue carries; an MTU the queue cannot carry is
// refused naming the field.
func TestShmMTU(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	small := queue.Sizes{DataSize: 1 << 20, PipeSize: 128 << 10, BufferSize: 512} // frames of at most 64 x 512 bytes
	for _, tc := range []struct {
		name string
		sz   queue.Sizes
		mtu  int
		want int // 0: refused
	}{
		{"agent's choice", queue.DefaultSizes(), 0, DefaultShmMTU},
		{"asked for", queue.DefaultSizes(), 9000, 9000},
		{"largest", queue.DefaultSizes(), 65535, 65535},
		{"agent's choice bounded by the queue", small, 0, 64*512 - 14},
		{"beyond the queue", small, 32755, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cid := fmt.Sprintf("mtu-%d-%d", tc.mtu, tc.sz.BufferSize)
			resp, err := r.tryAttachShmWith(t, cid, tc.sz, tc.mtu)
			if tc.want == 0 {
				var ae *agentapi.Error
				if !errors.As(err, &ae) || ae.Code != agentapi.CodeInvalidConfig || !strings.Contains(err.Error(), "mtu: MTU 32755 does not fit") {
					t.Fatalf("attach = %v, want an invalid-config error naming the mtu", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("attach: %v", err)
			}
			sb, err := dialSandbox(t, resp.SocketPath)
			if err != nil {
				t.Fatal(err)
			}
			defer sb.close()
			if resp.MTU != tc.want || int(sb.cfg.MTU) != tc.want {
				t.Errorf("MTU: attach answered %d, link config %d; want %d", resp.MTU, sb.cfg.MTU, tc.want)
			}
		})
	}
}

// TestSandboxReconnect: one sandbox at a time; after it hangs up, another
// dial gets a fresh pair and traffic flows again.
func TestSandboxReconnect(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	p := r.newTapPod(t, "pod-k", true)
	resp := r.attachShm(t, "sandbox-1")
	ln := listenIn(t, p.ns, p.addr(true))
	dst := netip.MustParseAddrPort(ln.Addr().String())

	first, err := dialSandbox(t, resp.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	transfer(t, ln, func() (net.Conn, error) { return first.dial(dst) }, 1<<20)
	if _, err := dialSandbox(t, resp.SocketPath); !errors.Is(err, shm.ErrDialRefused) {
		t.Fatalf("second dial while the first sandbox lives: %v, want ErrDialRefused", err)
	}
	for i := range 3 {
		first.close()
		next, err := dialSandbox(t, resp.SocketPath)
		if err != nil {
			t.Fatalf("dial after hang-up %d: %v", i, err)
		}
		if next.cfg.MAC != first.cfg.MAC || !slices.Equal(next.cfg.Addresses, first.cfg.Addresses) {
			t.Errorf("reconnect %d got config %+v, want the first one's %+v", i, next.cfg, first.cfg)
		}
		transfer(t, ln, func() (net.Conn, error) { return next.dial(dst) }, 1<<20)
		first = next
	}
}

// TestDetachReleases: detach removes the link, closes the TAP fd, releases
// the addresses, removes the socket and the record; detaching again and
// detaching an unknown attachment succeed; CHECK then fails with 102.
func TestDetachReleases(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	tunBefore := tunFDs(t)
	p := r.newTapPod(t, "pod-a", true)
	resp := r.attachShm(t, "sandbox-1")
	sb, err := dialSandbox(t, resp.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.router.Links(); len(got) != 2 {
		t.Fatalf("router links %v, want 2", got)
	}
	if got := tunFDs(t); got != tunBefore+1 {
		t.Errorf("%d TAP fds open with a tap attachment, want %d", got, tunBefore+1)
	}
	for _, k := range []linkspec.Key{{ContainerID: "pod-a", IfName: "eth0"}, {ContainerID: "sandbox-1", IfName: "eth0"}} {
		r.detach(t, k.ContainerID, k.IfName)
		r.detach(t, k.ContainerID, k.IfName) // DEL is idempotent
		if _, ok := r.ipam.Get(k); ok {
			t.Errorf("%s: IPAM allocation left after detach", k)
		}
		if _, err := os.Stat(filepath.Join(r.cfg.StateDir, attachmentsDir, recordFile(k))); !os.IsNotExist(err) {
			t.Errorf("%s: record left after detach (%v)", k, err)
		}
		_, err := r.call(t, &agentapi.Request{Op: agentapi.OpCheck, Check: &agentapi.CheckRequest{ContainerID: k.ContainerID, IfName: k.IfName}}, nil)
		var ae *agentapi.Error
		if !errors.As(err, &ae) || ae.Code != agentapi.CodeNoSuchAttachment {
			t.Errorf("%s: check after detach: %v, want code %d", k, err, agentapi.CodeNoSuchAttachment)
		}
	}
	r.detach(t, "never-attached", "eth0")
	if got := r.router.Links(); len(got) != 0 {
		t.Errorf("router links %v after detach, want none", got)
	}
	if got := tunFDs(t); got != tunBefore {
		t.Errorf("%d TAP fds open after detach, want %d", got, tunBefore)
	}
	if _, err := os.Stat(resp.SocketPath); !os.IsNotExist(err) {
		t.Errorf("socket %s left after detach (%v)", resp.SocketPath, err)
	}
	// The pod's device outlives the link (it is persistent); traffic does
	// not pass any more.
	_ = p
	sb.close()
}

// TestCheck: CHECK passes for matching addresses and names what differs.
func TestCheck(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	p := r.newTapPod(t, "pod-a", true)
	var ips []string
	for _, ip := range p.resp.IPs {
		ips = append(ips, ip.Address)
	}
	check := func(ips ...string) error {
		_, err := r.call(t, &agentapi.Request{Op: agentapi.OpCheck, Check: &agentapi.CheckRequest{ContainerID: "pod-a", IfName: "eth0", IPs: ips}}, nil)
		return err
	}
	if err := check(ips...); err != nil {
		t.Errorf("check with the attach's addresses: %v", err)
	}
	if err := check(); err != nil {
		t.Errorf("check without addresses: %v", err)
	}
	err := check("10.244.1.200/32", ips[1])
	var ae *agentapi.Error
	if !errors.As(err, &ae) || ae.Code != agentapi.CodeNoSuchAttachment || !strings.Contains(err.Error(), "10.244.1.200") {
		t.Errorf("check with a wrong address: %v, want code %d naming 10.244.1.200", err, agentapi.CodeNoSuchAttachment)
	}
	// Attaching the same container and interface again fails.
	if _, err := r.tryAttachShm(t, "pod-a"); err == nil {
		t.Error("second attach of pod-a/eth0 succeeded")
	}
}

// TestStatusAndGC: STATUS reports readiness and the count; GC detaches what
// is not valid and releases its addresses.
func TestStatusAndGC(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	r.newTapPod(t, "pod-a", true)
	r.attachShm(t, "sandbox-1")
	r.attachShm(t, "sandbox-2")
	st := r.mustCall(t, &agentapi.Request{Op: agentapi.OpStatus}, nil).Status
	if !st.Ready || st.Attachments != 3 {
		t.Errorf("status %+v, want ready with 3 attachments", st)
	}
	resp := r.mustCall(t, &agentapi.Request{Op: agentapi.OpGC, GC: &agentapi.GCRequest{Valid: []agentapi.Attachment{{ContainerID: "sandbox-2", IfName: "eth0"}}}}, nil)
	var got []string
	for _, a := range resp.GC.Released {
		got = append(got, a.ContainerID+"/"+a.IfName)
	}
	if want := []string{"pod-a/eth0", "sandbox-1/eth0"}; !slices.Equal(got, want) {
		t.Errorf("gc released %v, want %v", got, want)
	}
	if all := r.ipam.List(); len(all) != 1 || all[0].Owner.ContainerID != "sandbox-2" {
		t.Errorf("IPAM after gc: %v, want sandbox-2's only", all)
	}
	if got := r.router.Links(); len(got) != 0 {
		t.Errorf("router links %v, want none (sandbox-2 has no sandbox connected)", got)
	}
}

// TestConcurrentAttaches: 100 attaches at once get 100 distinct addresses
// per family.
func TestConcurrentAttaches(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	const n = 100
	var wg sync.WaitGroup
	resps := make([]*agentapi.AttachResponse, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			resps[i], errs[i] = r.tryAttachShm(t, "c"+string(rune('a'+i/26))+string(rune('a'+i%26)))
		})
	}
	wg.Wait()
	seen := map[string]int{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("attach %d: %v", i, errs[i])
		}
		if len(resps[i].IPs) != 2 {
			t.Fatalf("attach %d got %v, want two addresses", i, resps[i].IPs)
		}
		for _, ip := range resps[i].IPs {
			if j, dup := seen[ip.Address]; dup {
				t.Errorf("attaches %d and %d both got %s", j, i, ip.Address)
			}
			seen[ip.Address] = i
		}
	}
	if got := len(r.ipam.List()); got != n {
		t.Errorf("IPAM holds %d allocations, want %d", got, n)
	}
}

// TestTapDeviceGone: when a tap pod's device is deleted under the agent,
// the link leaves the router, CHECK fails with 102 naming the device, and
// DEL still releases the attachment.
func TestTapDeviceGone(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	p := r.newTapPod(t, "pod-a", true)
	testutil.Do(t, p.ns, func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	// The endpoint notices on its own goroutine; bounded wait.
	deadline := time.Now().Add(30 * time.Second)
	for len(r.router.Links()) != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := r.router.Links(); len(got) != 0 {
		t.Fatalf("router links %v after the device was deleted, want none", got)
	}
	_, err := r.call(t, &agentapi.Request{Op: agentapi.OpCheck, Check: &agentapi.CheckRequest{ContainerID: "pod-a", IfName: "eth0"}}, nil)
	var ae *agentapi.Error
	if !errors.As(err, &ae) || ae.Code != agentapi.CodeNoSuchAttachment || !strings.Contains(err.Error(), "TAP device eth0 is gone") {
		t.Errorf("check: %v, want code %d naming the gone device", err, agentapi.CodeNoSuchAttachment)
	}
	r.detach(t, "pod-a", "eth0")
	if got := r.ipam.List(); len(got) != 0 {
		t.Errorf("IPAM allocations %v after detach", got)
	}
}

// TestSandboxSessionsPaced: a sandbox connecting and hanging up as fast as
// it can starts no more sessions than the pacing allows for the time that
// passed (an upper bound: a slow machine only starts fewer), and a
// well-behaved sandbox connects afterwards.
func TestSandboxSessionsPaced(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	resp := r.attachShm(t, "sandbox-1")
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, pair, _, err := shm.DialPair(ctx, resp.SocketPath)
		cancel()
		if err == nil {
			c.Close()
			pair.Close()
		}
	}
	elapsed := time.Since(start)
	r.mu.Lock()
	att := r.attachments[linkspec.Key{ContainerID: "sandbox-1", IfName: "eth0"}]
	r.mu.Unlock()
	link := att.link.(*sandboxLink)
	link.mu.Lock()
	sessions := link.sessions
	link.mu.Unlock()
	bound := uint64(sessionBurst + float64(sessionRate)*elapsed.Seconds() + 2)
	t.Logf("%d sessions in %v (bound %d)", sessions, elapsed.Round(time.Millisecond), bound)
	if sessions == 0 || sessions > bound {
		t.Errorf("%d sessions in %v, want 1..%d", sessions, elapsed, bound)
	}
	sb, err := dialSandbox(t, resp.SocketPath)
	if err != nil {
		t.Fatalf("a well-behaved sandbox after the storm: %v", err)
	}
	sb.close()
}

// TestAttachCommitFailureUndone: when the record cannot be made durable
// (a directory stands where its temporary file goes), the attach fails and
// leaves nothing: no attachment, no addresses, no socket; once the disk is
// fine again the same attach succeeds.
func TestAttachCommitFailureUndone(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	k := linkspec.Key{ContainerID: "sandbox-1", IfName: "eth0"}
	blocker := filepath.Join(r.cfg.StateDir, attachmentsDir, recordFile(k)+tmpSuffix)
	if err := os.Mkdir(blocker, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := r.tryAttachShm(t, k.ContainerID)
	var ae *agentapi.Error
	if !errors.As(err, &ae) || ae.Code != agentapi.CodeAttachFailed {
		t.Fatalf("attach with the record unwritable: %v, want an error with code %d", err, agentapi.CodeAttachFailed)
	}
	r.mu.Lock()
	n := len(r.attachments)
	r.mu.Unlock()
	if n != 0 {
		t.Errorf("%d attachments after the failed attach", n)
	}
	if got := r.ipam.List(); len(got) != 0 {
		t.Errorf("addresses kept after the failed attach: %v", got)
	}
	if _, err := os.Stat(sandboxSocketPath(r.cfg.SandboxDir, k)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox socket after the failed attach: %v", err)
	}
	// The failed write's cleanup may have removed the empty directory.
	if err := os.Remove(blocker); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	r.attachShm(t, k.ContainerID)
	if got := r.ipam.List(); len(got) != 1 {
		t.Errorf("allocations after the retried attach: %v, want one", got)
	}
}
