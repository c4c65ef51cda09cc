package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/untrusted"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// Link types as netlink reports them.
const (
	linkTypeTAP   = "tuntap"
	linkTypeDummy = "dummy"
	linkTypeVeth  = "veth"
)

// linkConfig is what the pod's interface gets.
type linkConfig struct {
	MTU int
	// Addrs are host prefixes (/32, /128).
	Addrs  []netip.Prefix
	Routes []podRoute
	// Gateways get a permanent neighbour entry to GatewayMAC, so the pod
	// never resolves them. Empty GatewayMAC: no entries.
	Gateways   []netip.Addr
	GatewayMAC net.HardwareAddr
}

// podRoute is one route through the pod's interface. A zero GW is a
// device route.
type podRoute struct {
	Dst netip.Prefix
	GW  netip.Addr
	MTU int
}

// openNetNS opens CNI_NETNS for ADD or CHECK: it must be a network
// namespace other than the plugin's own.
func openNetNS(path string) (ns.NetNS, error) {
	netns, err := ns.GetNS(path)
	if err != nil {
		return nil, newError(agentapi.CodeInvalidEnvironment, "CNI_NETNS %s: not a network namespace: %v", untrusted.Quote(path), err)
	}
	// GetNS accepts any file on procfs; make sure this one is a netns.
	if t, err := unix.IoctlRetInt(int(netns.Fd()), unix.NS_GET_NSTYPE); err != nil || t != unix.CLONE_NEWNET {
		netns.Close()
		return nil, newError(agentapi.CodeInvalidEnvironment, "CNI_NETNS %s: not a network namespace", untrusted.Quote(path))
	}
	var own, pod unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &own); err == nil {
		if err := unix.Fstat(int(netns.Fd()), &pod); err == nil && own.Dev == pod.Dev && own.Ino == pod.Ino {
			netns.Close()
			return nil, newError(agentapi.CodeInvalidNetNS, "CNI_NETNS %s is the plugin's own network namespace", untrusted.Quote(path))
		}
	}
	return netns, nil
}

// newHandle returns a netlink handle in the calling thread's netns: one
// socket for all of an operation's requests, where the package-level
// functions open one per request.
func newHandle() (netlinksafe.Handle, error) {
	h, err := netlinksafe.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return h, fmt.Errorf("netlink socket: %w", err)
	}
	return h, nil
}

// newHandleIn returns a netlink handle made inside netns (one
// ns.NetNS.Do): a netlink socket keeps the netns it was made in, so the
// handle's requests act there from any thread, and the work on their
// answers runs on the caller's goroutine, whose stack has grown for them
// already, not on the new one Do starts.
func newHandleIn(netns ns.NetNS) (netlinksafe.Handle, error) {
	var h netlinksafe.Handle
	err := netns.Do(func(ns.NetNS) error {
		var err error
		h, err = newHandle()
		return err
	})
	return h, err
}

// errIfNameExists is the error of an ADD whose CNI_IFNAME exists in the
// pod's netns.
func errIfNameExists(name string) error {
	return newError(agentapi.CodeInterfaceExists, "CNI_IFNAME %s already exists in the pod's network namespace", untrusted.Quote(name))
}

// podIface is the pod's interface as ADD makes it: a netlink handle made
// inside the pod's netns, and the interface's link once created. A netlink
// socket keeps the netns it was made in, so the handle's requests act
// there from any thread: ADD enters the netns once (ns.NetNS.Do: a
// goroutine on a locked thread, two setns), to make the handle and, for a
// TAP device, open /dev/net/tun, which binds the device to the opener's
// netns the same way. Close it when ADD is done.
type podIface struct {
	// All immutable once made, but link, which the create methods set.
	h    netlinksafe.Handle
	name string
	link netlink.Link // nil until created
}

// Close closes the handle; the interface stays.
func (p *podIface) Close() { p.h.Close() }

// openPodIface opens a podIface for the interface name in netns, which
// must not exist yet (agentapi.CodeInterfaceExists), for a shm link's
// placeholder (createPlaceholder) or a veth link's pod side (createVeth).
func openPodIface(netns ns.NetNS, name string) (*podIface, error) {
	h, err := newHandleIn(netns)
	if err != nil {
		return nil, linkErr(err)
	}
	_, err = h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return &podIface{h: h, name: name}, nil
	case err != nil:
		err = fmt.Errorf("look up interface %s: %w", name, err)
	default:
		err = errIfNameExists(name)
	}
	h.Close()
	return nil, linkErr(err)
}

// createTAP creates the persistent TAP device name in netns, with a
// virtio-net header and offloads, and returns its fd and its podIface. It
// fails with agentapi.CodeInterfaceExists if name exists, which the
// creation itself checks (tuntap's Exclusive). On error nothing is left
// behind.
func createTAP(netns ns.NetNS, name string, gsoMaxSize int) (*os.File, *podIface, error) {
	var (
		f *os.File
		h netlinksafe.Handle
	)
	err := netns.Do(func(ns.NetNS) error {
		var err error
		if h, err = newHandle(); err != nil {
			return err
		}
		f, err = tuntap.Open(name, tuntap.Options{VnetHdr: true, Offload: true, Persist: true, Exclusive: true})
		if err != nil {
			h.Close()
		}
		if errors.Is(err, unix.EEXIST) {
			return errIfNameExists(name)
		}
		if err != nil {
			return fmt.Errorf("create tap %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return nil, nil, linkErr(err)
	}
	l, err := h.LinkByName(name)
	if err == nil && len(l.Attrs().HardwareAddr) != 6 {
		err = fmt.Errorf("device has MAC %q, not an Ethernet address", l.Attrs().HardwareAddr)
	}
	if err != nil {
		if l != nil {
			h.LinkDel(l)
		}
		f.Close()
		h.Close()
		return nil, nil, linkErr(fmt.Errorf("read tap %s: %w", name, err))
	}
	if gsoMaxSize > 0 {
		// Speed only (Config.tapGSOMaxSize): a kernel that cannot set it
		// keeps its default, and the pod works.
		_ = h.LinkSetGSOMaxSize(l, gsoMaxSize)
	}
	return f, &podIface{h: h, name: name, link: l}, nil
}

// createVeth creates the veth pair of a veth link: hostName in the calling
// thread's netns (the host's, the plugin's), its peer p.name in p's netns,
// which openPodIface found free. It fails with agentapi.CodeInterfaceExists
// if hostName exists (the link is added with NLM_F_EXCL). On error nothing
// is left behind. The agent sets the host side up and routes to it. The
// pod side keeps the kernel's gso_max_size (unlike a TAP device's,
// Config.tapGSOMaxSize): below it, a BBR sender's streams through the host
// move half as much (docs/speed.md); the router cuts the super-packets a
// sandbox's link does not fit (splitSuper in package router).
func (p *podIface) createVeth(netns ns.NetNS, hostName string) error {
	h, err := newHandle()
	if err != nil {
		return linkErr(err)
	}
	defer h.Close()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName}, PeerName: p.name, PeerNamespace: netlink.NsFd(int(netns.Fd()))}
	err = h.LinkAdd(v)
	if errors.Is(err, unix.EEXIST) {
		return newError(agentapi.CodeInterfaceExists, "the host side %s of the veth link already exists", untrusted.Quote(hostName))
	}
	if err != nil {
		return linkErr(fmt.Errorf("create veth %s (peer %s): %w", hostName, p.name, err))
	}
	l, err := p.h.LinkByName(p.name)
	if err == nil && len(l.Attrs().HardwareAddr) != 6 {
		err = fmt.Errorf("device has MAC %q, not an Ethernet address", l.Attrs().HardwareAddr)
	}
	if err != nil {
		if hl, herr := h.LinkByName(hostName); herr == nil {
			h.LinkDel(hl)
		}
		return linkErr(fmt.Errorf("read veth peer %s: %w", p.name, err))
	}
	p.link = l
	return nil
}

// deleteHostVeth deletes the host side of k's veth link from the calling
// thread's netns (the host's), if it exists, and with it its peer in the
// pod's netns, and the ifb device of its egress bandwidth limit, which the
// agent makes: the rollback of createVeth, and DEL's. The names are the
// link's own (linkspec.HostVethName, linkspec.HostIfbName), so the devices
// are shm-cni's; a veth named CNI_IFNAME in the pod's netns may be another
// program's and is left alone (deleteLink).
func deleteHostVeth(k linkspec.Key) error {
	h, err := newHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	for _, d := range []struct{ name, typ string }{{linkspec.HostVethName(k), linkTypeVeth}, {linkspec.HostIfbName(k), "ifb"}} {
		l, err := h.LinkByName(d.name)
		var nf netlink.LinkNotFoundError
		switch {
		case errors.As(err, &nf):
			continue
		case err != nil:
			return fmt.Errorf("look up %s: %w", d.name, err)
		case l.Type() != d.typ:
			continue
		}
		if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete %s: %w", d.name, err)
		}
	}
	return nil
}

// createPlaceholder creates the placeholder interface of a shm link in
// netns (p's), with mac (nil: the kernel picks one), mtu and the alias
// AttachSocketAliasPrefix+socketPath. It is a dummy device, or, on kernels
// built without dummy support (CONFIG_DUMMY), a persistent TAP device
// nobody attaches to: both only carry the configuration for runtimes that
// read the netns. It fails with agentapi.CodeInterfaceExists if the name
// exists, which the creation itself checks (the link is added with
// NLM_F_EXCL, the TAP device with tuntap's Exclusive).
func (p *podIface) createPlaceholder(netns ns.NetNS, mac net.HardwareAddr, mtu int, socketPath string) error {
	name := p.name
	d := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu, HardwareAddr: mac}}
	err := p.h.LinkAdd(d)
	if errors.Is(err, unix.EOPNOTSUPP) {
		err = netns.Do(func(ns.NetNS) error { return createTAPPlaceholder(name, mac, mtu) })
	}
	if errors.Is(err, unix.EEXIST) {
		return linkErr(errIfNameExists(name))
	}
	if err != nil {
		return linkErr(fmt.Errorf("create placeholder %s: %w", name, err))
	}
	l, err := p.h.LinkByName(name)
	if err == nil {
		if err = p.h.LinkSetAlias(l, AttachSocketAliasPrefix+socketPath); err != nil {
			err = fmt.Errorf("set alias: %w", err)
		}
	}
	if err != nil {
		if l != nil {
			p.h.LinkDel(l)
		} else {
			p.h.LinkDel(d)
		}
		return linkErr(fmt.Errorf("placeholder %s: %w", name, err))
	}
	p.link = l
	return nil
}

// createTAPPlaceholder creates a persistent TAP device name in the calling
// thread's netns with mac and mtu and closes its fd.
func createTAPPlaceholder(name string, mac net.HardwareAddr, mtu int) error {
	f, err := tuntap.Open(name, tuntap.Options{Persist: true, Exclusive: true})
	if err != nil {
		return err
	}
	f.Close()
	l, err := netlinksafe.LinkByName(name)
	if err == nil {
		err = netlink.LinkSetMTU(l, mtu)
	}
	if err == nil && mac != nil {
		err = netlink.LinkSetHardwareAddr(l, mac)
	}
	if err != nil {
		if l != nil {
			netlink.LinkDel(l)
		}
		return fmt.Errorf("tap placeholder: %w", err)
	}
	return nil
}

// configure applies lc to the interface createTAP or createPlaceholder
// made: MTU, addresses, link up, an on-link route to every IPv4 gateway,
// the routes, and permanent neighbour entries for the gateways.
func (p *podIface) configure(lc linkConfig) error {
	h, l, name := p.h, p.link, p.name
	if l.Attrs().MTU != lc.MTU {
		if err := h.LinkSetMTU(l, lc.MTU); err != nil {
			return linkErr(fmt.Errorf("set %s mtu %d: %w", name, lc.MTU, err))
		}
	}
	for _, a := range lc.Addrs {
		addr := &netlink.Addr{IPNet: ipNet(a)}
		if a.Addr().Is6() {
			// The agent owns the address plan: duplicate address
			// detection would only hold the address tentative.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(l, addr); err != nil {
			return linkErr(fmt.Errorf("add address %s to %s: %w", a, name, err))
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return linkErr(fmt.Errorf("set %s up: %w", name, err))
	}
	idx := l.Attrs().Index
	onLink := map[netip.Addr]bool{}
	for _, r := range lc.Routes {
		if !r.GW.IsValid() || !r.GW.Is4() || onLink[r.GW] {
			continue
		}
		onLink[r.GW] = true
		// 169.254.1.1 dev eth0 scope link: the gateway is on the link
		// although no address prefix covers it.
		gw := &netlink.Route{LinkIndex: idx, Dst: ipNet(netip.PrefixFrom(r.GW, 32)), Scope: netlink.SCOPE_LINK}
		if err := h.RouteReplace(gw); err != nil {
			return linkErr(fmt.Errorf("add route %s dev %s scope link: %w", r.GW, name, err))
		}
	}
	for _, r := range lc.Routes {
		nr := &netlink.Route{LinkIndex: idx, Dst: ipNet(r.Dst), MTU: r.MTU}
		switch {
		case !r.GW.IsValid():
			nr.Scope = netlink.SCOPE_LINK
		case r.GW.Is6():
			// fe80::1 is on the link; onlink spares waiting for the
			// kernel's fe80::/64 route.
			nr.Gw = net.IP(r.GW.AsSlice())
			nr.Flags = int(netlink.FLAG_ONLINK)
		default:
			nr.Gw = net.IP(r.GW.AsSlice())
		}
		if err := h.RouteReplace(nr); err != nil {
			return linkErr(fmt.Errorf("add route %s via %s dev %s: %w", r.Dst, r.GW, name, err))
		}
	}
	if len(lc.GatewayMAC) == 0 {
		return nil
	}
	for _, gw := range lc.Gateways {
		fam := unix.AF_INET
		if gw.Is6() {
			fam = unix.AF_INET6
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: fam, State: netlink.NUD_PERMANENT, IP: net.IP(gw.AsSlice()), HardwareAddr: lc.GatewayMAC}
		if err := h.NeighSet(n); err != nil {
			return linkErr(fmt.Errorf("add neighbour %s lladdr %s dev %s: %w", gw, lc.GatewayMAC, name, err))
		}
	}
	return nil
}

// deleteLink deletes the interface name from the netns at path, if both
// still exist and the interface is a TAP or dummy device (the kinds
// shm-cni creates there; anything else is left alone: a veth link's pair
// goes with its host side, deleteHostVeth), through one netlink
// handle made in the netns. It reports what it did. A missing netns or
// interface is not an error: DEL must succeed when the resources are
// already gone.
func deleteLink(path, name string) (string, error) {
	if path == "" {
		return "no netns given", nil
	}
	netns, err := ns.GetNS(path)
	var notExist ns.NSPathNotExistErr
	var notNS ns.NSPathNotNSErr
	if errors.As(err, &notExist) || errors.As(err, &notNS) {
		return "netns already gone", nil
	}
	if err != nil {
		return "", linkErr(err)
	}
	h, err := newHandleIn(netns)
	netns.Close()
	if err != nil {
		return "", linkErr(err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return "interface already gone", nil
	case err != nil:
		return "", linkErr(fmt.Errorf("look up %s: %w", name, err))
	}
	if t := l.Type(); t != linkTypeTAP && t != linkTypeDummy {
		return fmt.Sprintf("interface is a %s device, not shm-cni's; left alone", t), nil
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return "", linkErr(fmt.Errorf("delete %s: %w", name, err))
	}
	return "interface deleted", nil
}

// linkState is what CHECK reads back from the pod's interface.
type linkState struct {
	Type   string
	Alias  string
	MAC    net.HardwareAddr
	MTU    int
	Up     bool
	Addrs  []netip.Prefix
	Routes []podRoute
	// Neigh are the permanent neighbour entries, by IP.
	Neigh map[netip.Addr]net.HardwareAddr
}

// inspectLink reads the interface name in netns.
func inspectLink(netns ns.NetNS, name string) (*linkState, error) {
	var st linkState
	err := netns.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName(name)
		if err != nil {
			return fmt.Errorf("look up %s: %w", name, err)
		}
		a := l.Attrs()
		st = linkState{Type: l.Type(), Alias: a.Alias, MAC: a.HardwareAddr, MTU: a.MTU, Up: a.Flags&net.FlagUp != 0, Neigh: map[netip.Addr]net.HardwareAddr{}}
		addrs, err := netlinksafe.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list addresses of %s: %w", name, err)
		}
		for _, ad := range addrs {
			if p, ok := prefixOf(ad.IPNet); ok {
				st.Addrs = append(st.Addrs, p)
			}
		}
		routes, err := netlinksafe.RouteList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list routes of %s: %w", name, err)
		}
		for _, r := range routes {
			dst, ok := prefixOf(r.Dst)
			if !ok {
				continue
			}
			gw, _ := netip.AddrFromSlice(r.Gw)
			st.Routes = append(st.Routes, podRoute{Dst: dst, GW: gw.Unmap(), MTU: r.MTU})
		}
		neighs, err := netlink.NeighList(a.Index, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list neighbours of %s: %w", name, err)
		}
		for _, n := range neighs {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
				st.Neigh[ip.Unmap()] = n.HardwareAddr
			}
		}
		return nil
	})
	if err != nil {
		return nil, linkErr(err)
	}
	return &st, nil
}

// linkErr gives an error from the netns side agentapi.CodeLinkSetup unless it has a
// code already.
func linkErr(err error) error {
	if err == nil || codeOf(err) != agentapi.CodeInternal {
		return err
	}
	return types.NewError(agentapi.CodeLinkSetup, err.Error(), "")
}

// ipNet converts a prefix to the netlink form.
func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// prefixOf converts a netlink prefix; a nil one is not valid.
func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if bits != a.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}
