package node

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NewNetNS creates a fresh, bind-mounted network namespace with its
// loopback up. Delete it with DeleteNetNS.
func NewNetNS() (ns.NetNS, error) {
	n, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("new netns: %w", err)
	}
	if err := n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		DeleteNetNS(n)
		return nil, fmt.Errorf("new netns %s: loopback up: %w", n.Path(), err)
	}
	return n, nil
}

// DeleteNetNS closes n and lazily unmounts and removes its bind mount. The
// namespace goes away once nothing else holds it (a process in it, an open
// TAP fd of the agent). Deleting a namespace already deleted is not an
// error.
//
// The unmount is lazy (MNT_DETACH) because a plain one fails with EBUSY
// while any process has the file open, and every child forked meanwhile
// (a CNI plugin run by a concurrent test step) briefly holds all of the
// parent's descriptors between fork and exec.
func DeleteNetNS(n ns.NetNS) error {
	if n == nil {
		return nil
	}
	path := n.Path()
	cerr := n.Close()
	if errors.Is(cerr, unix.EBADF) || (cerr != nil && strings.Contains(cerr.Error(), "already been closed")) {
		cerr = nil
	}
	var uerr error
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		uerr = fmt.Errorf("unmount: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		uerr = errors.Join(uerr, err)
	}
	if err := errors.Join(cerr, uerr); err != nil {
		return fmt.Errorf("delete netns %s: %w", path, err)
	}
	return nil
}

// Sysctl writes value to the sysctl key (dotted, under net.) inside n.
func Sysctl(n ns.NetNS, key, value string) error {
	return n.Do(func(ns.NetNS) error {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s in %s: %w", key, value, n.Path(), err)
		}
		return nil
	})
}

// LinkNames returns the names of the network interfaces in n, sorted.
func LinkNames(n ns.NetNS) ([]string, error) {
	var names []string
	err := n.Do(func(ns.NetNS) error {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("list links in %s: %w", n.Path(), err)
		}
		for _, l := range links {
			names = append(names, l.Attrs().Name)
		}
		return nil
	})
	sort.Strings(names)
	return names, err
}

// connectOutside joins host and outside with a veth pair, hostIf in host and
// outsideIf in outside, addresses them (hostAddrs, outsideAddrs: one prefix
// per family), and routes nothing else: the outside knows no pod address,
// so pod traffic only comes back when the host masqueraded it.
func connectOutside(host, outside ns.NetNS, hostIf, outsideIf string, hostAddrs, outsideAddrs []netip.Prefix) error {
	err := host.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: hostIf},
			PeerName:      outsideIf,
			PeerNamespace: netlink.NsFd(int(outside.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s/%s: %w", hostIf, outsideIf, err)
		}
		return addrsUp(hostIf, hostAddrs)
	})
	if err != nil {
		return err
	}
	return outside.Do(func(ns.NetNS) error { return addrsUp(outsideIf, outsideAddrs) })
}

// addrsUp adds addrs to the link name of the current netns (without
// duplicate address detection, so they are usable at once) and sets it up.
func addrsUp(name string, addrs []netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	for _, p := range addrs {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(l, a); err != nil {
			return fmt.Errorf("add %s to %s: %w", p, name, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// RouteOutsideToPods routes the node's pod CIDRs through the host in the
// outside namespace, as a network that peers with the pod network does:
// then pod traffic comes back without masquerade.
func (n *Node) RouteOutsideToPods() error {
	return n.Outside.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(outsideVeth)
		if err != nil {
			return fmt.Errorf("link %s: %w", outsideVeth, err)
		}
		for _, p := range n.PodCIDRs() {
			gw := HostOutside4.Addr()
			if p.Addr().Is6() {
				gw = HostOutside6.Addr()
			}
			r := &netlink.Route{
				LinkIndex: l.Attrs().Index,
				Dst:       &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())},
				Gw:        gw.AsSlice(),
			}
			if err := netlink.RouteAdd(r); err != nil {
				return fmt.Errorf("route %s via %s in the outside: %w", p, gw, err)
			}
		}
		return nil
	})
}
