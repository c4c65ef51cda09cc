package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// CNI error codes the tests expect (the plugin's and the agent's own
// constants are not imported: the codes are the contract).
const (
	codeIncompatibleVersion = 1
	codeUnsupportedField    = 2
	codeInvalidEnvironment  = 4
	codeInvalidConfig       = 7
	codeInvalidNetNS        = 8
	codeTryAgainLater       = 11
	codeNotAvailable        = 50
	codeInterfaceExists     = 121
	codeCheckFailed         = 122
)

// networkList loads the node's conflist or fails t.
func networkList(t *testing.T, n *node.Node) *libcni.NetworkConfigList {
	t.Helper()
	l, err := n.NetworkList()
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// wantCode fails t unless err carries the CNI error code want.
func wantCode(t *testing.T, what string, err error, want uint) {
	t.Helper()
	if err == nil {
		t.Errorf("%s succeeded, want CNI error code %d", what, want)
		return
	}
	if got := node.ErrorCode(err); got != want {
		t.Errorf("%s: CNI error code %d, want %d (%v)", what, got, want, err)
	}
}

// wantNoAttachments fails t unless the agent has no attachment, no
// attachment record and no address allocation left.
func wantNoAttachments(t *testing.T, ctx context.Context, n *node.Node) {
	t.Helper()
	wantAttachments(t, ctx, n)
}

// wantAttachments fails t unless the agent's attachments, records and
// address allocations are exactly those of the container IDs given.
func wantAttachments(t *testing.T, ctx context.Context, n *node.Node, containerIDs ...string) {
	t.Helper()
	slices.Sort(containerIDs)
	atts, err := n.Attachments(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range atts {
		got = append(got, a.ContainerID)
	}
	slices.Sort(got)
	if !slices.Equal(got, containerIDs) {
		t.Errorf("agent attachments: %v, want %v", got, containerIDs)
	}
	allocs, err := n.Allocations()
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, a := range allocs {
		got = append(got, a.ContainerID)
	}
	slices.Sort(got)
	if !slices.Equal(got, containerIDs) {
		t.Errorf("agent address allocations: %v, want %v", got, containerIDs)
	}
	recs, err := n.AttachmentRecords()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != len(containerIDs) {
		t.Errorf("agent attachment records: %v, want %d", recs, len(containerIDs))
	}
}

// wantLinks fails t unless the links of x are exactly want.
func wantLinks(t *testing.T, x ns.NetNS, want ...string) {
	t.Helper()
	got, err := node.LinkNames(x)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("links in %s: %v, want %v", x.Path(), got, want)
	}
}

// wantHostLink checks that the node's host namespace has the interface
// name, or has not.
func wantHostLink(t *testing.T, n *node.Node, name string, want bool) {
	t.Helper()
	got, err := node.LinkNames(n.Host)
	if err != nil {
		t.Fatal(err)
	}
	if has := slices.Contains(got, name); has != want {
		t.Errorf("host has %s: %t, want %t (links %v)", name, has, want, got)
	}
}

// TestAddCheckDelDel runs a pod through ADD, CHECK, DEL and DEL again for
// each kind: the result describes the link, CHECK passes on a healthy pod
// and fails once its addresses are gone, and DEL removes everything (the
// interface, a veth's host side, the agent's attachment, record, addresses
// and socket), once and again.
func TestAddCheckDelDel(t *testing.T) {
	for _, kind := range []string{node.KindTap, node.KindShm, node.KindVeth} {
		t.Run(kind, func(t *testing.T) {
			n := newNode(t, node.Options{})
			ctx := testContext(t)
			l := networkList(t, n)
			cni := n.CNI("")
			p := addPod(t, ctx, n, "p", kind)

			if len(p.Result.Interfaces) != 1 || p.Result.Interfaces[0].Name != node.IfName || p.Result.Interfaces[0].Sandbox != p.NS.Path() {
				t.Errorf("result interfaces: %+v, want one %s in %s", p.Result.Interfaces, node.IfName, p.NS.Path())
			}
			if !node.PodCIDR4.Contains(p.Addr4) || !node.PodCIDR6.Contains(p.Addr6) {
				t.Errorf("addresses %s, %s outside the pod CIDRs", p.Addr4, p.Addr6)
			}
			for _, ip := range p.Result.IPs {
				if ones, bits := ip.Address.Mask.Size(); ones != bits {
					t.Errorf("address %s: want a /32 or /128", ip.Address.String())
				}
			}
			if kind == node.KindShm {
				if _, err := os.Stat(p.SocketPath); err != nil {
					t.Errorf("sandbox socket: %v", err)
				}
			} else if p.SocketPath != "" {
				t.Errorf("tap pod result has socketPath %s", p.SocketPath)
			}
			wantLinks(t, p.NS, "lo", node.IfName)
			wantAttachments(t, ctx, n, p.RT.ContainerID)
			hostVeth := linkspec.HostVethName(linkspec.Key{ContainerID: p.RT.ContainerID, IfName: node.IfName})
			wantHostLink(t, n, hostVeth, kind == node.KindVeth)

			if err := n.CNICheck(ctx, cni, l, p.RT); err != nil {
				t.Errorf("CHECK of a healthy pod: %v", err)
			}
			// Take the pod's addresses away: CHECK must notice.
			if err := p.NS.Do(func(ns.NetNS) error {
				link, err := netlink.LinkByName(node.IfName)
				if err != nil {
					return err
				}
				addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
				if err != nil {
					return err
				}
				for _, a := range addrs {
					if a.IP.IsGlobalUnicast() || a.IP.IsPrivate() {
						if err := netlink.AddrDel(link, &a); err != nil {
							return err
						}
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			wantCode(t, "CHECK of a pod without its addresses", n.CNICheck(ctx, cni, l, p.RT), codeCheckFailed)

			for i := range 2 {
				if err := n.CNIDel(ctx, cni, l, p.RT); err != nil {
					t.Fatalf("DEL %d: %v", i+1, err)
				}
				wantLinks(t, p.NS, "lo")
				wantNoAttachments(t, ctx, n)
				wantHostLink(t, n, hostVeth, false)
				if _, err := os.Stat(p.SocketPath); kind == node.KindShm && !os.IsNotExist(err) {
					t.Errorf("sandbox socket after DEL: %v, want it gone", err)
				}
			}
		})
	}
}

// TestDelAfterNetnsGone deletes a pod's network namespace before its DEL,
// as a runtime may after a crash: DEL succeeds and the agent lets go of
// everything.
func TestDelAfterNetnsGone(t *testing.T) {
	for _, kind := range []string{node.KindTap, node.KindShm, node.KindVeth} {
		t.Run(kind, func(t *testing.T) {
			n := newNode(t, node.Options{})
			ctx := testContext(t)
			p := addPod(t, ctx, n, "p", kind)
			if err := node.DeleteNetNS(p.NS); err != nil {
				t.Fatal(err)
			}
			if err := n.CNIDel(ctx, n.CNI(""), networkList(t, n), p.RT); err != nil {
				t.Fatalf("DEL with the netns gone: %v", err)
			}
			wantNoAttachments(t, ctx, n)
			wantHostLink(t, n, linkspec.HostVethName(linkspec.Key{ContainerID: p.RT.ContainerID, IfName: node.IfName}), false)
		})
	}
}

// TestAgentDown stops the agent under live pods: STATUS fails with code 50,
// ADD with 11 (try again later), DEL succeeds and removes the pod's
// interface. The restarted agent drops the attachment whose device is gone
// by itself, and GC releases the rest.
func TestAgentDown(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	l := networkList(t, n)
	cni := n.CNI("")
	tap := addPod(t, ctx, n, "tap", node.KindTap)
	shm := addPod(t, ctx, n, "shm", node.KindShm)
	if err := n.CNIStatus(ctx, cni, l); err != nil {
		t.Fatalf("STATUS with the agent up: %v", err)
	}

	if err := n.StopAgent(); err != nil {
		t.Fatalf("stop agent: %v", err)
	}
	wantCode(t, "STATUS with the agent down", n.CNIStatus(ctx, cni, l), codeNotAvailable)
	x, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	_, err = n.CNIAdd(ctx, cni, l, node.RuntimeConf("late", "e2e-late", x.Path(), node.KindTap))
	wantCode(t, "ADD with the agent down", err, codeTryAgainLater)
	wantLinks(t, x, "lo")
	for _, p := range []*node.Pod{tap, shm} {
		if err := n.CNIDel(ctx, cni, l, p.RT); err != nil {
			t.Errorf("DEL of %s with the agent down: %v", p.Name, err)
		}
		wantLinks(t, p.NS, "lo")
	}

	if err := n.StartAgent(ctx); err != nil {
		t.Fatalf("restart agent: %v", err)
	}
	if err := n.CNIStatus(ctx, cni, l); err != nil {
		t.Errorf("STATUS with the agent back: %v", err)
	}
	// The tap pod's device is gone: not re-adopted. The shm pod's netns
	// still exists, so only GC can tell its attachment is stale.
	atts, err := n.Attachments(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range atts {
		if a.ContainerID == tap.RT.ContainerID {
			t.Errorf("the restarted agent re-adopted %s, whose TAP device is gone", a.ContainerID)
		}
	}
	if err := n.CNIGC(ctx, cni, l, nil); err != nil {
		t.Fatalf("GC: %v", err)
	}
	wantNoAttachments(t, ctx, n)
}

// TestGCReleasesLeaked leaks attachments the runtime forgot (added through
// another libcni cache, their netns deleted, but a veth link's) beside ones
// it knows: GC with one valid attachment DELs the runtime's stale ones
// (libcni) and releases the leaked ones (the agent, which deletes a veth
// link's host side), and leaves the valid pod working.
func TestGCReleasesLeaked(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	l := networkList(t, n)
	cni := n.CNI("")
	keep := addPod(t, ctx, n, "keep", node.KindShm)
	stale := addPod(t, ctx, n, "stale", node.KindTap)
	staleVeth := addPod(t, ctx, n, "stale-veth", node.KindVeth)
	forgetful := n.CNI(t.TempDir())
	var leaked []string
	for _, kind := range []string{node.KindTap, node.KindShm, node.KindVeth} {
		x, err := n.NewPodNetNS()
		if err != nil {
			t.Fatal(err)
		}
		rt := node.RuntimeConf("leak-"+kind, "e2e-leak-"+kind, x.Path(), kind)
		if _, err := n.CNIAdd(ctx, forgetful, l, rt); err != nil {
			t.Fatal(err)
		}
		leaked = append(leaked, rt.ContainerID)
		if kind == node.KindVeth {
			// Its netns stays, and the host side with it: the agent
			// deletes that.
			t.Cleanup(func() { node.DeleteNetNS(x) })
			continue
		}
		if err := node.DeleteNetNS(x); err != nil {
			t.Fatal(err)
		}
	}
	wantAttachments(t, ctx, n, append([]string{keep.RT.ContainerID, stale.RT.ContainerID, staleVeth.RT.ContainerID}, leaked...)...)

	valid := []types.GCAttachment{{ContainerID: keep.RT.ContainerID, IfName: node.IfName}}
	if err := n.CNIGC(ctx, cni, l, valid); err != nil {
		t.Fatalf("GC: %v", err)
	}
	wantAttachments(t, ctx, n, keep.RT.ContainerID)
	wantLinks(t, stale.NS, "lo")
	wantLinks(t, staleVeth.NS, "lo")
	for _, cid := range []string{staleVeth.RT.ContainerID, "e2e-leak-" + node.KindVeth} {
		wantHostLink(t, n, linkspec.HostVethName(linkspec.Key{ContainerID: cid, IfName: node.IfName}), false)
	}
	if err := n.CNICheck(ctx, cni, l, keep.RT); err != nil {
		t.Errorf("CHECK of the valid pod after GC: %v", err)
	}
	if _, err := n.Transfer(ctx, n.HostPeer(), n.PodPeer(keep), false, 1<<20); err != nil {
		t.Errorf("traffic to the valid pod after GC: %v", err)
	}
}

// TestConcurrentAdds adds 100 pods at once, half of each kind: every ADD
// succeeds with its own addresses, and after 100 concurrent DELs nothing
// is left.
func TestConcurrentAdds(t *testing.T) {
	const pods = 100
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	added := make([]*node.Pod, pods)
	errs := make([]error, pods)
	var wg sync.WaitGroup
	for i := range pods {
		kind := node.KindTap
		if i%2 == 1 {
			kind = node.KindShm
		}
		wg.Go(func() { added[i], errs[i] = n.AddPod(ctx, fmt.Sprintf("c%d", i), kind) })
	}
	wg.Wait()
	seen := map[netip.Addr]string{}
	var ids []string
	for i, p := range added {
		if errs[i] != nil {
			t.Errorf("ADD %d: %v", i, errs[i])
			continue
		}
		ids = append(ids, p.RT.ContainerID)
		for _, a := range []netip.Addr{p.Addr4, p.Addr6} {
			if other, dup := seen[a]; dup {
				t.Errorf("%s has %s, as %s has", p.Name, a, other)
			}
			seen[a] = p.Name
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	wantAttachments(t, ctx, n, ids...)
	// The first and the last pod of each kind carry traffic.
	for _, p := range []*node.Pod{added[0], added[1], added[pods-2], added[pods-1]} {
		if _, err := n.Transfer(ctx, n.HostPeer(), n.PodPeer(p), false, 1<<20); err != nil {
			t.Error(err)
		}
	}

	for i, p := range added {
		wg.Go(func() { errs[i] = n.DeletePod(ctx, p) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("DEL %d: %v", i, err)
		}
	}
	wantNoAttachments(t, ctx, n)
}
