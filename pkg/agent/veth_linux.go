package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// vethKind is the kind of a kernel pod's veth link: the plugin makes a veth
// pair, the pod's side in its netns, the host's (linkspec.HostVethName) in
// the host netns; the agent routes the pod's addresses to the host side, in
// the host (a device route and a permanent neighbour entry per address, so
// the host never resolves them) and in the router (through the uplink:
// Router.AddHostLink). The host's kernel then carries the pod's traffic to
// and from kernel pods of the same kind, the host and the world by itself,
// as the ptp plugin's veth pairs do: no system call of the agent's per
// packet, where a TAP link costs a read and a write. The agent's anti-spoofing
// for it is the host's (a strict reverse path check on every host side,
// masq_linux.go); its bandwidth limit is the host's too: tbf qdiscs, as
// the reference bandwidth plugin's (vethbw_linux.go). NetworkPolicy is
// the router's, in the host's kernel: it queues the first packet of each
// connection of an isolated pod to the router, whose enforcer judges it
// (router.Router.HostPolicy, hostpolicy_linux.go in package router).
type vethKind struct{}

// prepare implements linkKind.prepare: the agent's MTU unless the
// conflist sets one; refused with a Kubernetes client (whose NetworkPolicy
// the agent enforces) where the host cannot queue packets to the router.
func (vethKind) prepare(a *Agent, _ linkspec.Key, rec *record, req *agentapi.AttachRequest) error {
	if a.kube != nil && !a.router.HostPolicy() {
		return invalid("kind %s: the agent enforces NetworkPolicy, which the host cannot hand it for veth links here (the agent's log says why): use kind %s or %s", agentapi.KindVeth, agentapi.KindTap, agentapi.KindShm)
	}
	if req.MAC == "" {
		return invalid("attach.mac: required for kind %s (the pod side's MAC)", agentapi.KindVeth)
	}
	if rec.MTU == 0 {
		rec.MTU = a.cfg.MTU
	}
	return nil
}

// attach implements linkKind.attach: no descriptor comes with it.
func (vethKind) attach(a *Agent, rec *record, _ []*os.File) (podLink, error) {
	return a.attachVeth(rec)
}

// readopt implements linkKind.readopt: the host side must still be there;
// its routes are put back (they went with nothing but the device).
func (vethKind) readopt(a *Agent, rec *record) (podLink, error) {
	return a.attachVeth(rec)
}

// orphan implements linkKind.orphan: a link whose host side, if any is
// left, DEL or GC still deletes.
func (vethKind) orphan(a *Agent, rec *record) podLink {
	return vethOrphan{noLink: noLink{checkErr: vethGoneError(rec)}, a: a, key: rec.key()}
}

// vethOrphan is a veth link that could not be re-adopted.
type vethOrphan struct {
	noLink
	a   *Agent
	key linkspec.Key
}

// release implements podLink.release.
func (o vethOrphan) release() { o.a.deleteHostVeth(o.key) }

// vethGoneError is what CHECK says of a veth link without its host side.
func vethGoneError(rec *record) error {
	return fmt.Errorf("the host side %s of the veth link is gone", linkspec.HostVethName(rec.key()))
}

// vethLink is a kernel pod's veth link.
type vethLink struct {
	a      *Agent       // immutable
	rec    *record      // immutable
	linkID string       // the router's id of the host link; immutable
	name   string       // the host side's name; immutable
	mac    string       // the host side's MAC; immutable
	log    *slog.Logger // immutable
}

// attachVeth routes rec's addresses to the host side of its veth pair, in
// the host and in the router, and installs the pod's bandwidth limit. It
// returns an error wrapping errGone when the host side does not exist. On
// failure the host's routes and qdiscs stay with the device (the plugin's
// rollback deletes it, and the ifb device); the router has nothing.
func (a *Agent) attachVeth(rec *record) (*vethLink, error) {
	name := linkspec.HostVethName(rec.key())
	h, err := netlink.NewHandleAt(netns.NsHandle(a.hostNS.Fd()))
	if err != nil {
		return nil, fmt.Errorf("netlink in the host netns: %w", err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return nil, fmt.Errorf("%w: %v", errGone, vethGoneError(rec))
	case err != nil:
		return nil, fmt.Errorf("look up %s: %w", name, err)
	case l.Type() != "veth":
		return nil, invalid("host side %s of the veth link is a %s device", name, l.Type())
	}
	podMAC, err := net.ParseMAC(rec.PodMAC)
	if err != nil {
		return nil, invalid("attach.mac: %v", err)
	}
	if l.Attrs().MTU != rec.MTU {
		if err := h.LinkSetMTU(l, rec.MTU); err != nil {
			return nil, fmt.Errorf("set %s mtu %d: %w", name, rec.MTU, err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	if slices.ContainsFunc(rec.Addrs, netip.Addr.Is4) {
		if err := a.forwardOn(name); err != nil {
			return nil, err
		}
	}
	if err := shapeVeth(h, l, rec); err != nil {
		return nil, err
	}
	idx := l.Attrs().Index
	if err := holdGateways(h, l, rec.Addrs); err != nil {
		return nil, err
	}
	for _, ad := range rec.Addrs {
		dst := &net.IPNet{IP: ad.AsSlice(), Mask: net.CIDRMask(ad.BitLen(), ad.BitLen())}
		rt := &netlink.Route{LinkIndex: idx, Dst: dst, Scope: netlink.SCOPE_LINK}
		// The host's own packets to the pod leave from the node
		// gateway, as to a pod on any other kind of link (where the
		// uplink's route gives it): the address NetworkPolicy lets
		// in, kubelet's probes' source.
		for _, p := range a.cfg.PodCIDRs {
			if gw, err := router.NodeGateway(p); err == nil && p.Contains(ad) {
				rt.Src = gw.AsSlice()
			}
		}
		if err := h.RouteReplace(rt); err != nil {
			return nil, fmt.Errorf("route %s dev %s: %w", ad, name, err)
		}
		n := &netlink.Neigh{LinkIndex: idx, Family: familyOf(ad), State: netlink.NUD_PERMANENT, IP: ad.AsSlice(), HardwareAddr: podMAC}
		if err := h.NeighSet(n); err != nil {
			return nil, fmt.Errorf("neighbour %s lladdr %s dev %s: %w", ad, podMAC, name, err)
		}
	}
	id := rec.key().String()
	if err := a.router.AddHostLink(id, rec.Addrs); err != nil {
		return nil, err
	}
	return &vethLink{a: a, rec: rec, linkID: id, name: name, mac: l.Attrs().HardwareAddr.String(), log: a.log.With("link", id)}, nil
}

// forwardOn turns IPv4 forwarding on for what arrives on the host side
// name (net.ipv4.conf.<name>.forwarding), as Calico does on its devices:
// the host forwards a veth pod's packets where its global switch is off
// and forwarding is on only on the devices that need it (IPv6 has no
// such switch per device: its forwarding is the host's,
// net.ipv6.conf.all.forwarding, which the router's check reports).
func (a *Agent) forwardOn(name string) error {
	return a.hostNS.Do(func(ns.NetNS) error {
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+name+"/forwarding", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("turn forwarding on for %s: %w", name, err)
		}
		return nil
	})
}

// holdGateways puts the pod's gateways (router.GatewayV4 for an IPv4 pod,
// router.GatewayV6 for an IPv6 one) on the host side l, as the ptp plugin
// puts its gateway on each host veth: the pod's packets to its gateway
// are then the host's, which answers them (a ping, as the router answers
// on a tap link) instead of forwarding them off the node by its default
// route. The pod resolves them to l's MAC through its permanent neighbour
// entries, so the host never has to answer for them on the link.
func holdGateways(h *netlink.Handle, l netlink.Link, addrs []netip.Addr) error {
	for _, gw := range []netip.Addr{router.GatewayV4, router.GatewayV6} {
		if !slices.ContainsFunc(addrs, func(a netip.Addr) bool { return a.Is4() == gw.Is4() }) {
			continue
		}
		bits := 32
		a := &netlink.Addr{Scope: int(netlink.SCOPE_LINK)}
		if gw.Is6() {
			bits, a.Flags = 64, unix.IFA_F_NODAD
		}
		a.IPNet = &net.IPNet{IP: gw.AsSlice(), Mask: net.CIDRMask(bits, gw.BitLen())}
		if err := h.AddrReplace(l, a); err != nil {
			return fmt.Errorf("gateway %s on %s: %w", gw, l.Attrs().Name, err)
		}
	}
	return nil
}

// familyOf is a's netlink address family.
func familyOf(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// stop implements podLink.stop: the router forgets the pod's addresses.
// The host side stays, with its routes: a restarted agent re-adopts it,
// and the pod's traffic through the host's kernel carries on meanwhile.
func (l *vethLink) stop() {
	if err := l.a.router.RemoveLink(l.linkID); err != nil {
		l.log.Warn("remove host link", "err", err)
	}
}

// release implements podLink.release: the host side goes, with the pod's
// side and the host's routes to the pod, if still there (DEL deletes the
// pair from the pod's side too; GC only here), and the ifb device of its
// egress limit.
func (l *vethLink) release() { l.a.deleteHostVeth(l.rec.key()) }

// deleteHostVeth deletes the host side of k's veth link and its ifb device
// from the host netns, those that exist.
func (a *Agent) deleteHostVeth(k linkspec.Key) {
	h, err := netlink.NewHandleAt(netns.NsHandle(a.hostNS.Fd()))
	if err != nil {
		a.log.Warn("delete the host side of a veth link", "link", k, "err", err)
		return
	}
	defer h.Close()
	for _, d := range []struct{ name, typ string }{{linkspec.HostVethName(k), "veth"}, {linkspec.HostIfbName(k), "ifb"}} {
		if err := deleteLinkOfType(h, d.name, d.typ); err != nil {
			a.log.Warn("delete the host side of a veth link", "link", k, "err", err)
		}
	}
}

// check implements podLink.check: the host side must be there and up,
// with its bandwidth limit.
func (l *vethLink) check() error {
	h, err := netlink.NewHandleAt(netns.NsHandle(l.a.hostNS.Fd()))
	if err != nil {
		return fmt.Errorf("netlink in the host netns: %w", err)
	}
	defer h.Close()
	_, err = l.checkWith(h)
	return err
}

// checkWith is check through h (the host netns); it returns the host side
// when it found it.
func (l *vethLink) checkWith(h *netlink.Handle) (netlink.Link, error) {
	dev, err := h.LinkByName(l.name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return nil, vethGoneError(l.rec)
	case err != nil:
		return nil, fmt.Errorf("look up %s: %w", l.name, err)
	case dev.Attrs().Flags&net.FlagUp == 0:
		return dev, fmt.Errorf("the host side %s of the veth link is down", l.name)
	}
	return dev, checkShaped(h, dev, l.rec)
}

// answer implements podLink.answer: the pod's gateways are the host side.
func (l *vethLink) answer(resp *agentapi.AttachResponse) { resp.GatewayMAC = l.mac }

// status implements podLink.status: the counters are the host side's (Rx
// what the pod sent, Tx what it was sent) and its bandwidth limit's tbf
// qdiscs' (vethbw_linux.go); the router has none of it.
func (l *vethLink) status(st *LinkStatus) {
	h, err := netlink.NewHandleAt(netns.NsHandle(l.a.hostNS.Fd()))
	if err != nil {
		return
	}
	defer h.Close()
	dev, err := l.checkWith(h)
	st.Up = err == nil
	if dev == nil || dev.Attrs().Statistics == nil {
		return
	}
	ds := dev.Attrs().Statistics
	rs := router.LinkStats{
		RxPackets: ds.RxPackets, RxBytes: ds.RxBytes, TxPackets: ds.TxPackets, TxBytes: ds.TxBytes,
		RxDrops: ds.RxDropped, TxDrops: ds.TxDropped,
	}
	rs.BandwidthIngressDelayed, rs.BandwidthIngressDrops = tbfCounts(h, dev)
	if ifb, err := h.LinkByName(linkspec.HostIfbName(l.rec.key())); err == nil && ifb.Type() == "ifb" {
		rs.BandwidthEgressDelayed, rs.BandwidthEgressDrops = tbfCounts(h, ifb)
	}
	st.Router = &rs
}

// socketPath implements podLink.socketPath: a veth link has none.
func (l *vethLink) socketPath() string { return "" }
