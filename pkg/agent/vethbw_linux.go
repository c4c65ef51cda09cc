package agent

import (
	"errors"
	"fmt"
	"math"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// Bandwidth limits of veth links (the CNI bandwidth capability), in the
// host's kernel, as the reference bandwidth plugin installs them:
//
//   - to the pod (ingress): a tbf qdisc at the root of the host side,
//     whose transmit is the pod's receive;
//   - from the pod (egress): an ifb device (linkspec.HostIfbName), an
//     ingress qdisc on the host side whose u32 filter redirects all the pod
//     sends to the ifb, and a tbf qdisc at the root of the ifb. The ifb
//     gives the packets back to the host side's receive path, so the
//     host's firewall sees them come in on the host side as before.
//
// Each tbf is sized as the router sizes the shaper of a tap or shm link
// (router.ShaperSize), so a limit means the same on every kind: a bucket of
// the burst but at least the largest packet (tbf segments a GSO packet
// larger than its bucket), a queue of 25 ms at the rate plus the burst,
// within bounds. Their counters are the link's bandwidth counters: the
// times the tbf's head packet waited for tokens (its overlimits) as held,
// its drops as dropped.
//
// Attach installs them idempotently, so an agent re-adopting the link puts
// back what is missing. The ifb goes with the link (release; the plugin's
// DEL deletes it too, for when the agent is down).

// tbfHandle is the handle of the tbf qdiscs, at the root of their device.
var tbfHandle = netlink.MakeHandle(1, 0)

// shapeVeth installs rec's bandwidth limit on the host side host of its
// veth link, through h (the host netns). It does nothing without a limit.
func shapeVeth(h *netlink.Handle, host netlink.Link, rec *record) error {
	bw := rec.Bandwidth
	if bw == nil {
		return nil
	}
	name := host.Attrs().Name
	if bw.IngressRate != 0 {
		if err := h.QdiscReplace(newTBF(host.Attrs().Index, bw.IngressRate, bw.IngressBurst)); err != nil {
			return fmt.Errorf("tbf qdisc on %s (ingress limit): %w", name, err)
		}
	}
	if bw.EgressRate == 0 {
		return nil
	}
	ifb, err := ensureIfb(h, linkspec.HostIfbName(rec.key()), rec.MTU)
	if err != nil {
		return err
	}
	if err := h.QdiscReplace(newTBF(ifb.Attrs().Index, bw.EgressRate, bw.EgressBurst)); err != nil {
		return fmt.Errorf("tbf qdisc on %s (egress limit): %w", ifb.Attrs().Name, err)
	}
	if err := redirectToIfb(h, host, ifb); err != nil {
		return fmt.Errorf("redirect %s's receive to %s (egress limit): %w", name, ifb.Attrs().Name, err)
	}
	return nil
}

// newTBF returns the tbf qdisc at the root of device index that limits it
// to rateBits bit/s with a burst of burstBits.
func newTBF(index int, rateBits, burstBits uint64) *netlink.Tbf {
	bucket, queue := router.ShaperSize(rateBits, burstBits)
	rate := max(rateBits/8, 1)
	// tbf takes the bucket as the time it takes to fill at the rate, in
	// the packet scheduler's ticks (32 bits: a few minutes at most, which
	// only a burst of minutes at the rate reaches).
	ticks := min(float64(bucket)*1e6/float64(rate)*netlink.TickInUsec(), math.MaxUint32)
	return &netlink.Tbf{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: index, Handle: tbfHandle, Parent: netlink.HANDLE_ROOT},
		Rate:       rate,
		Buffer:     uint32(ticks),
		Limit:      uint32(queue),
	}
}

// ensureIfb returns the ifb device name, created up with mtu if missing.
func ensureIfb(h *netlink.Handle, name string, mtu int) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		err = h.LinkAdd(&netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu, Flags: net.FlagUp, TxQLen: 0}})
		if err != nil {
			return nil, fmt.Errorf("create ifb %s: %w", name, err)
		}
		if l, err = h.LinkByName(name); err != nil {
			return nil, fmt.Errorf("look up %s: %w", name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("look up %s: %w", name, err)
	case l.Type() != "ifb":
		return nil, invalid("%s, the ifb device of a veth link's egress limit, is a %s device", name, l.Type())
	}
	if l.Attrs().MTU != mtu {
		if err := h.LinkSetMTU(l, mtu); err != nil {
			return nil, fmt.Errorf("set %s mtu %d: %w", name, mtu, err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	return l, nil
}

// redirectToIfb makes host's ingress qdisc redirect every packet to ifb:
// it adds the qdisc and the filter unless they are there, and replaces a
// filter that redirects elsewhere (to an ifb device since deleted).
func redirectToIfb(h *netlink.Handle, host, ifb netlink.Link) error {
	ingress := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: host.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS,
	}}
	qs, err := h.QdiscList(host)
	if err != nil {
		return fmt.Errorf("list qdiscs: %w", err)
	}
	haveIngress := false
	for _, q := range qs {
		haveIngress = haveIngress || q.Type() == "ingress"
	}
	if !haveIngress {
		if err := h.QdiscAdd(ingress); err != nil {
			return fmt.Errorf("add ingress qdisc: %w", err)
		}
	}
	fs, err := h.FilterList(host, ingress.Handle)
	if err != nil {
		return fmt.Errorf("list filters: %w", err)
	}
	if redirectsTo(fs, ifb) {
		return nil
	}
	for _, f := range fs {
		if err := h.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete a stale filter: %w", err)
		}
	}
	return h.FilterAdd(&netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: host.Attrs().Index, Parent: ingress.Handle, Priority: 1, Protocol: unix.ETH_P_ALL},
		ClassId:     netlink.MakeHandle(1, 1),
		RedirIndex:  ifb.Attrs().Index,
	})
}

// checkShaped reports what of rec's bandwidth limit is missing on the host
// side host, through h; nil when all of it is there.
func checkShaped(h *netlink.Handle, host netlink.Link, rec *record) error {
	bw := rec.Bandwidth
	if bw == nil {
		return nil
	}
	if bw.IngressRate != 0 && rootTBF(h, host) == nil {
		return fmt.Errorf("the ingress bandwidth limit's tbf qdisc on %s is gone", host.Attrs().Name)
	}
	if bw.EgressRate == 0 {
		return nil
	}
	name := linkspec.HostIfbName(rec.key())
	ifb, err := h.LinkByName(name)
	if err != nil || ifb.Type() != "ifb" || rootTBF(h, ifb) == nil {
		return fmt.Errorf("the egress bandwidth limit's ifb device %s or its tbf qdisc is gone", name)
	}
	fs, err := h.FilterList(host, netlink.MakeHandle(0xffff, 0))
	if err != nil {
		return fmt.Errorf("list %s's filters: %w", host.Attrs().Name, err)
	}
	if redirectsTo(fs, ifb) {
		return nil
	}
	return fmt.Errorf("the egress bandwidth limit's redirect from %s to %s is gone", host.Attrs().Name, name)
}

// redirectsTo reports whether one of fs is a u32 filter redirecting to ifb.
func redirectsTo(fs []netlink.Filter, ifb netlink.Link) bool {
	for _, f := range fs {
		if u, ok := f.(*netlink.U32); ok && u.RedirIndex == ifb.Attrs().Index {
			return true
		}
	}
	return false
}

// rootTBF returns l's root tbf qdisc, or nil.
func rootTBF(h *netlink.Handle, l netlink.Link) *netlink.Tbf {
	qs, err := h.QdiscList(l)
	if err != nil {
		return nil
	}
	for _, q := range qs {
		if t, ok := q.(*netlink.Tbf); ok && q.Attrs().Parent == netlink.HANDLE_ROOT {
			return t
		}
	}
	return nil
}

// tbfCounts returns the counters of l's root tbf: the times its head
// packet waited for tokens, and its drops (0, 0 without one).
func tbfCounts(h *netlink.Handle, l netlink.Link) (held, dropped uint64) {
	t := rootTBF(h, l)
	if t == nil || t.Statistics == nil || t.Statistics.Queue == nil {
		return 0, 0
	}
	return uint64(t.Statistics.Queue.Overlimits), uint64(t.Statistics.Queue.Drops)
}

// deleteLinkOfType deletes the device name of type typ from the netns of
// h, if it exists; another device of that name is left alone.
func deleteLinkOfType(h *netlink.Handle, name, typ string) error {
	l, err := h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return nil
	case err != nil:
		return fmt.Errorf("look up %s: %w", name, err)
	case l.Type() != typ:
		return nil
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}
