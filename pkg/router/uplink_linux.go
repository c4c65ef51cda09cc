package router

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint/tap"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// uplink is the router's side of the uplink TUN device.
type uplink struct {
	// fd is the TUN device's fd, owned by the uplink. Closing it deletes the
	// (non-persistent) device and with it the host's addresses and routes.
	fd int
	// ep drives fd for the stack.
	ep stack.LinkEndpoint
	// nicID is ep's NIC, 0 until the NIC exists.
	nicID tcpip.NICID
	// fast is the fast path's entry for ep (fastuplink.go), as a
	// destination and as a source; set just before the NIC is made.
	fast *fastDst
	// stopping is set before the router stops the uplink, so that the
	// reader stopping then is not reported as a failure.
	stopping atomic.Bool
}

// closeFD closes the TUN fd, which deletes the device; call it after the
// endpoint's reader has stopped.
func (u *uplink) closeFD() error {
	if err := unix.Close(u.fd); err != nil {
		return fmt.Errorf("close uplink fd %d: %w", u.fd, err)
	}
	return nil
}

// readerStopped reports the uplink reader stopping on its own (the device
// was deleted, the fd broke): the node has lost its pods' connectivity.
func (u *uplink) readerStopped(log *slog.Logger, err error) {
	if u.stopping.Load() {
		return
	}
	log.Error("uplink reader stopped; pods are cut off from the host", "err", err)
}

// newUplinkEndpoint drives the uplink TUN fd (IP packets, no
// packet-information header, a virtio-net header with the kernel's
// offloads) with pkg/endpoint/tap's TUN endpoint, as a Forwarding link: TCP
// super-packets cross between the host and pod TAP links whole. Unlike
// gVisor's fdbased endpoint, whose Attach(nil) waits for its reader while
// RemoveNIC holds the stack lock (a reader delivering a host packet needs that
// lock: Close could hang), it only signals its reader there; Wait waits.
// onStop is called once if the device goes away under the endpoint.
func newUplinkEndpoint(fd int, mtu uint32, poll time.Duration, onStop func(error)) (stack.LinkEndpoint, error) {
	ep, err := tap.New(tap.Options{
		FD:         fd,
		MTU:        mtu,
		VnetHdr:    true,
		Forwarding: true,
		Poll:       poll,
		OnClosed:   onStop,
	})
	if err != nil {
		return nil, fmt.Errorf("TUN endpoint on uplink fd %d: %w", fd, err)
	}
	return ep, nil
}

// openUplink creates (or attaches to) the TUN device name in the host
// namespace, with a virtio-net header and the kernel's offloads (partial
// checksums, TCP super-packets): the host hands the router whole
// super-packets, as it would to a veth.
func openUplink(hostNS ns.NetNS, name string) (int, error) {
	fd := -1
	err := hostNS.Do(func(ns.NetNS) error {
		f, err := tuntap.Open(name, tuntap.Options{TUN: true, VnetHdr: true, Offload: true})
		if err != nil {
			return err
		}
		defer f.Close()
		// A descriptor of our own, for the uplink to own; the device
		// (not persistent) lives as long as it is open.
		rc, err := f.SyscallConn()
		if err != nil {
			return err
		}
		var dupErr error
		if err := rc.Control(func(u uintptr) { fd, dupErr = unix.FcntlInt(u, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
			return err
		}
		return dupErr
	})
	if err != nil {
		return -1, fmt.Errorf("open uplink %s: %w", name, err)
	}
	return fd, nil
}

// configureHostUplink sets the uplink device's MTU, assigns the node gateway
// addresses (as /32 and /128, so the kernel adds no connected route of its
// own), brings it up and routes the pod CIDRs to it. Every step replaces what
// exists, so it is safe to repeat.
func configureHostUplink(nl *netlink.Handle, cfg Config) error {
	link, err := nl.LinkByName(cfg.UplinkName)
	if err != nil {
		return fmt.Errorf("find uplink %s: %w", cfg.UplinkName, err)
	}
	if err := nl.LinkSetMTU(link, cfg.UplinkMTU); err != nil {
		return fmt.Errorf("set uplink %s MTU %d: %w", cfg.UplinkName, cfg.UplinkMTU, err)
	}
	for _, p := range cfg.PodCIDRs {
		gw, err := NodeGateway(p)
		if err != nil {
			return fmt.Errorf("node gateway of %s: %w", p, err)
		}
		addr := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(gw, gw.BitLen()))}
		if gw.Is6() {
			// Usable at once: no duplicate address detection on a
			// point-to-point device only the router is behind.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := nl.AddrReplace(link, addr); err != nil {
			return fmt.Errorf("add %s to uplink %s: %w", gw, cfg.UplinkName, err)
		}
	}
	if err := nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("set uplink %s up: %w", cfg.UplinkName, err)
	}
	for _, p := range cfg.PodCIDRs {
		route := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       prefixToIPNet(p),
			Scope:     netlink.SCOPE_LINK,
		}
		if err := nl.RouteReplace(route); err != nil {
			return fmt.Errorf("route %s dev %s: %w", p, cfg.UplinkName, err)
		}
	}
	return nil
}

// deleteHostUplink deletes the uplink device if it still exists.
func deleteHostUplink(nl *netlink.Handle, name string) error {
	link, err := nl.LinkByName(name)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return nil
		}
		return fmt.Errorf("find uplink %s: %w", name, err)
	}
	if err := nl.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete uplink %s: %w", name, err)
	}
	return nil
}

// prefixToIPNet converts p to the net.IPNet netlink wants.
func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}
