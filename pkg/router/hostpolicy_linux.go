package router

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/policy"
)

// NetworkPolicy for the pods the host routes (host links: the agent's kind
// veth). Their packets cross the host's kernel alone, so the router's
// enforcer judges them there: the host's connection tracking lets through
// what belongs to a connection it knows, and queues (NFQUEUE) the first
// packet of any other to the router when either end is an address policy
// isolates, where policy.Enforcer.FromHostLink judges it as the router
// judges a packet of its own links. Two chains of the router's table
// (inet shm-cni) do it:
//
//	chain policy-forward { type filter hook forward priority filter
//		ct state established,related accept
//		iifname "shmv*" ip saddr @policy-isolated4 queue num Q      (ip daddr, ip6 alike)
//		oifname "shmv*" ip saddr @policy-isolated4 queue num Q+1    (ip daddr, ip6 alike)
//	}
//	chain policy-input { type filter hook input priority filter
//		ct state established,related accept
//		iifname "shmv*" icmpv6 type 133-137 accept                  (NDP)
//		iifname "shmv*" ip saddr @policy-isolated4 queue num Q      (ip6 alike)
//	}
//
// Queue Q holds what a host link's pod sent (judged as FromPod judges),
// queue Q+1 what goes to one (as FromUplink judges: its ingress rules, and
// the sender's egress rules when the sender is a local pod too). The sets
// hold Snapshot.IsolatedAddrs, so that the connections of pods no policy
// isolates never leave the kernel. Without the router (the agent stopped
// or restarting) a queued packet is dropped: isolated pods open no
// connection then, and their open ones carry on.
//
// A new snapshot may deny connections the kernel tracks: the router walks
// the host's connection tracking table after each one, and each
// connection of a host link's address that the snapshot denies (judged by
// its opening tuple, after the host's address translation) is revoked in
// the enforcer (policy.Enforcer.Revoke) and deleted from the table. Its
// next packets are queued again and dropped, both ways, until it falls
// silent or a later snapshot allows it, as the router's own tracked
// connections are.

// DefaultPolicyQueue is the first of the two netfilter queues of
// Config.PolicyQueue.
const DefaultPolicyQueue = 3740

// Names in the router's table.
const (
	hostPolicyForwardChain = "policy-forward"
	hostPolicyInputChain   = "policy-input"
	hostPolicySet4         = "policy-isolated4"
	hostPolicySet6         = "policy-isolated6"
)

// policyQueueLen is how many packets each queue holds for the router
// before the kernel drops the next (first packets of connections alone).
const policyQueueLen = 4096

// hostPolicy is the host links' NetworkPolicy: the two queues' readers and
// the walker of the host's connection tracking table.
type hostPolicy struct {
	r      *Router
	base   uint16
	queues [2]*nfqueue.Nfqueue
	cancel context.CancelFunc
	// kick asks the walker for a walk; closed to stop it.
	kick chan struct{}
	wg   sync.WaitGroup
	// mu guards addrs, the sets' elements, and stopped.
	mu sync.Mutex
	// +checklocks:mu
	addrs []netip.Addr
	// stopped: stop closed kick; a late setPolicy does nothing.
	// +checklocks:mu
	stopped bool
	// Counters: packets queued, denied; connections revoked.
	queued, denied, revoked atomic.Uint64
}

// HostPolicy reports whether NetworkPolicy is enforced on host links: the
// router's table has its chains and the router reads its queues. Without
// it, an agent that enforces policy refuses host links.
func (r *Router) HostPolicy() bool { return r.hostPol.Load() != nil }

// HostPolicyCounts are the counters of NetworkPolicy on host links.
type HostPolicyCounts struct {
	// Queued counts the packets the host queued to the router; Denied
	// those of them it dropped.
	Queued, Denied uint64
	// Revoked counts the connections the host tracked that a new
	// snapshot denied, deleted from its connection tracking.
	Revoked uint64
}

// HostPolicyCounts returns the counters of NetworkPolicy on host links,
// false where it is not enforced (HostPolicy).
func (r *Router) HostPolicyCounts() (HostPolicyCounts, bool) {
	h := r.hostPol.Load()
	if h == nil {
		return HostPolicyCounts{}, false
	}
	// Denied before queued: a packet is counted queued first, so that
	// Queued-Denied never goes below zero.
	d := h.denied.Load()
	return HostPolicyCounts{Queued: h.queued.Load(), Denied: d, Revoked: h.revoked.Load()}, true
}

// startHostPolicyLocked opens the queues and installs the chains and sets,
// or logs why it could not (host links then carry no policy: see
// HostPolicy).
//
// +checklocks:r.mu
func (r *Router) startHostPolicyLocked() {
	h, err := r.newHostPolicy()
	if err != nil {
		r.log.Error("NetworkPolicy on veth links unavailable: the host cannot queue their packets to the router", "err", err)
		return
	}
	r.hostPol.Store(h)
}

func (r *Router) newHostPolicy() (_ *hostPolicy, err error) {
	h := &hostPolicy{r: r, base: r.cfg.PolicyQueue, kick: make(chan struct{}, 1)}
	if s := r.policy.Snapshot(); s != nil {
		// A snapshot set before Start: its addresses, and a walk.
		h.mu.Lock()
		h.addrs = s.IsolatedAddrs()
		h.mu.Unlock()
		h.kick <- struct{}{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	defer func() {
		if err != nil {
			h.stop()
		}
	}()
	for i := range h.queues {
		q, err := nfqueue.Open(&nfqueue.Config{
			NetNS:        int(r.hostNS.Fd()),
			NfQueue:      h.base + uint16(i),
			MaxPacketLen: policyHeaderBytes,
			MaxQueueLen:  policyQueueLen,
			Copymode:     nfqueue.NfQnlCopyPacket,
			// A GSO packet is queued whole, not segmented first.
			Flags: nfqueue.NfQaCfgFlagGSO,
		})
		if err != nil {
			return nil, fmt.Errorf("open netfilter queue %d: %w", h.base+uint16(i), err)
		}
		h.queues[i] = q
		fromPod := i == 0
		errFn := func(err error) int {
			if ctx.Err() != nil {
				return 1
			}
			if errors.Is(err, unix.ENOBUFS) {
				// The socket overflowed: those packets are
				// dropped; read on.
				return 0
			}
			r.log.Error("netfilter queue: read failed; veth links' new connections that policy judges are dropped", "queue", h.base+uint16(i), "err", err)
			return 1
		}
		if err := q.RegisterWithErrorFunc(ctx, h.hook(q, fromPod), errFn); err != nil {
			return nil, fmt.Errorf("bind netfilter queue %d: %w", h.base+uint16(i), err)
		}
	}
	if err := r.withNFT(h.install); err != nil {
		return nil, err
	}
	h.wg.Add(1)
	go h.walker(ctx)
	return h, nil
}

// stop stops the readers and the walker (the chains go with the table).
func (h *hostPolicy) stop() {
	h.cancel()
	for _, q := range h.queues {
		if q != nil {
			q.Close()
		}
	}
	h.mu.Lock()
	h.stopped = true
	close(h.kick)
	h.mu.Unlock()
	h.wg.Wait()
}

// hook judges one queued packet.
func (h *hostPolicy) hook(q *nfqueue.Nfqueue, fromPod bool) nfqueue.HookFunc {
	return func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		h.queued.Add(1)
		v := nfqueue.NfDrop
		if a.Payload != nil && h.r.policy.FromHostLink(*a.Payload, fromPod) {
			v = nfqueue.NfAccept
		} else {
			h.denied.Add(1)
		}
		if err := q.SetVerdict(*a.PacketID, v); err != nil {
			h.r.log.Debug("netfilter queue: verdict not sent (the kernel drops the packet)", "err", err)
		}
		return 0
	}
}

// install adds the sets (with the current addresses) and the chains to the
// router's table, in one transaction: with nftables' queue statement,
// else, when the kernel refuses it, with xtables' NFQUEUE target.
func (h *hostPolicy) install(c *nftables.Conn) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	err := h.installWith(c, true)
	if err == nil {
		h.r.log.Debug("NetworkPolicy on veth links: packets queued with nftables' queue statement")
		return nil
	}
	if err2 := h.installWith(c, false); err2 != nil {
		return fmt.Errorf("add the policy chains to inet %s: %w (with nftables' queue: %v)", masqTableName, err2, err)
	}
	h.r.log.Debug("NetworkPolicy on veth links: packets queued with xtables' NFQUEUE target (no nftables queue statement here)", "err", err)
	return nil
}

// +checklocks:h.mu
func (h *hostPolicy) installWith(c *nftables.Conn, native bool) error {
	t := masqTable()
	// Delete what an earlier install left (each add first, so that the
	// delete of a missing object succeeds).
	fwd := &nftables.Chain{Name: hostPolicyForwardChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter}
	in := &nftables.Chain{Name: hostPolicyInputChain, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter}
	c.AddChain(fwd)
	c.AddChain(in)
	c.DelChain(fwd)
	c.DelChain(in)
	sets := h.sets()
	for _, s := range sets {
		if err := c.AddSet(s, nil); err != nil {
			return err
		}
		c.DelSet(s)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("remove the old policy chains: %w", err)
	}
	for i, s := range sets {
		if err := c.AddSet(s, setElements(h.addrs, i == 1)); err != nil {
			return err
		}
	}
	c.AddChain(fwd)
	c.AddChain(in)
	for _, r := range hostPolicyRules(h.base, sets, native) {
		ch := fwd
		if r.input {
			ch = in
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r.exprs})
	}
	return c.Flush()
}

// sets returns the two sets of isolated addresses, IPv4 and IPv6.
func (h *hostPolicy) sets() [2]*nftables.Set {
	t := masqTable()
	return [2]*nftables.Set{
		{Table: t, Name: hostPolicySet4, KeyType: nftables.TypeIPAddr},
		{Table: t, Name: hostPolicySet6, KeyType: nftables.TypeIP6Addr},
	}
}

func setElements(addrs []netip.Addr, v6 bool) []nftables.SetElement {
	var out []nftables.SetElement
	for _, a := range addrs {
		if a.Is6() == v6 {
			out = append(out, nftables.SetElement{Key: a.AsSlice()})
		}
	}
	return out
}

// hostPolicyRule is one rule of the forward chain, or of the input chain.
type hostPolicyRule struct {
	input bool
	exprs []expr.Any
}

// hostPolicyRules returns the chains' rules (see above), queue numbers
// from base.
func hostPolicyRules(base uint16, sets [2]*nftables.Set, native bool) []hostPolicyRule {
	established := []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
	dev := func(key expr.MetaKey) []expr.Any {
		return []expr.Any{
			&expr.Meta{Key: key, Register: 1},
			// A prefix without its NUL: nftables' wildcard "shmv*".
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(linkspec.HostVethPrefix)},
		}
	}
	queue := func(num uint16) expr.Any {
		if native {
			return &expr.Queue{Num: num, Total: 1}
		}
		// struct xt_NFQ_info_v3: queuenum, queues_total, flags (u16).
		info := make([]byte, 6)
		binary.NativeEndian.PutUint16(info[0:], num)
		binary.NativeEndian.PutUint16(info[2:], 1)
		u := xt.Unknown(info)
		return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &u}
	}
	lookup := func(v6, src bool) []expr.Any {
		nfproto, off, size, s := byte(unix.NFPROTO_IPV4), uint32(ipv4DstOffset), uint32(4), sets[0]
		if v6 {
			nfproto, off, size, s = unix.NFPROTO_IPV6, ipv6DstOffset, 16, sets[1]
		}
		if src && v6 {
			off = ipv6SrcOffset
		} else if src {
			off = ipv4SrcOffset
		}
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: size},
			&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
		}
	}
	cat := func(parts ...[]expr.Any) []expr.Any {
		var out []expr.Any
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	rules := []hostPolicyRule{{exprs: established}}
	for q, key := range []expr.MetaKey{expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME} {
		for _, v6 := range []bool{false, true} {
			for _, src := range []bool{true, false} {
				rules = append(rules, hostPolicyRule{exprs: cat(dev(key), lookup(v6, src), []expr.Any{queue(base + uint16(q))})})
			}
		}
	}
	ndp := cat(dev(expr.MetaKeyIIFNAME), []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		// Router and neighbour solicitations and advertisements,
		// redirects (RFC 4861).
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{137}},
		&expr.Verdict{Kind: expr.VerdictAccept},
	})
	rules = append(rules, hostPolicyRule{input: true, exprs: established}, hostPolicyRule{input: true, exprs: ndp})
	for _, v6 := range []bool{false, true} {
		rules = append(rules, hostPolicyRule{input: true, exprs: cat(dev(expr.MetaKeyIIFNAME), lookup(v6, true), []expr.Any{queue(base)})})
	}
	return rules
}

// hostPolicyRuleCounts are how many rules the forward and input chains hold.
func hostPolicyRuleCounts() (fwd, in int) {
	for _, r := range hostPolicyRules(0, [2]*nftables.Set{{}, {}}, false) {
		if r.input {
			in++
		} else {
			fwd++
		}
	}
	return fwd, in
}

// intact reports whether the chains are in the table as installed.
func (h *hostPolicy) intact(c *nftables.Conn) bool {
	t := masqTable()
	fwd, in := hostPolicyRuleCounts()
	for name, want := range map[string]int{hostPolicyForwardChain: fwd, hostPolicyInputChain: in} {
		rules, err := c.GetRules(t, &nftables.Chain{Name: name, Table: t})
		if err != nil || len(rules) != want {
			return false
		}
	}
	return true
}

// setPolicy makes the sets hold s's isolated addresses (nil: none) and
// asks the walker for a walk.
func (h *hostPolicy) setPolicy(s *policy.Snapshot) {
	var want []netip.Addr
	if s != nil {
		want = s.IsolatedAddrs()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return // a SetPolicy that raced with the router's stop
	}
	if !slices.Equal(h.addrs, want) {
		h.addrs = want
		err := h.r.withNFT(func(c *nftables.Conn) error {
			for i, set := range h.sets() {
				c.FlushSet(set)
				if err := c.SetAddElements(set, setElements(want, i == 1)); err != nil {
					return err
				}
			}
			return c.Flush()
		})
		if err != nil {
			h.r.log.Error("NetworkPolicy on veth links: the isolated addresses' sets not updated", "err", err)
		}
	}
	if len(want) == 0 {
		return // nothing isolated: the snapshot denies nothing
	}
	select {
	case h.kick <- struct{}{}:
	default: // a walk is due already; it reads the newest snapshot
	}
}

// walkGap is the least time between two walks' starts: a busy cluster's
// snapshots come every debounce interval, and a walk reads the host's whole
// connection tracking table; the snapshots between two walks make one.
const walkGap = time.Second

// walker walks the host's connection tracking table when kicked.
func (h *hostPolicy) walker(ctx context.Context) {
	defer h.wg.Done()
	for range h.kick {
		next := time.After(walkGap)
		n, err := h.walk()
		if err != nil {
			h.r.log.Error("NetworkPolicy on veth links: connection tracking table not checked against the new policy", "err", err)
		}
		if n > 0 {
			h.r.log.Info("NetworkPolicy on veth links: connections the new policy denies cut", "connections", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-next:
		}
	}
}

// walk revokes and deletes the host's tracked connections of host links'
// addresses that the installed snapshot denies, and returns how many.
func (h *hostPolicy) walk() (int, error) {
	if h.r.policy.Snapshot() == nil {
		return 0, nil
	}
	local := h.r.hostLinkAddrs()
	if len(local) == 0 {
		return 0, nil
	}
	nl, err := netlink.NewHandleAt(netns.NsHandle(h.r.hostNS.Fd()), unix.NETLINK_NETFILTER)
	if err != nil {
		return 0, fmt.Errorf("netlink in the host netns: %w", err)
	}
	defer nl.Close()
	var errs []error
	total := 0
	for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		flows, err := nl.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("list the connection tracking table: %w", err))
			continue
		}
		cut := flowSet{}
		for _, f := range flows {
			if !touches(f, local) {
				continue
			}
			t, ok := openingTuple(f)
			if !ok || h.r.policy.Allows(t) {
				continue
			}
			var closing bool
			if tcp, ok := f.ProtoInfo.(*netlink.ProtoInfoTCP); ok {
				switch tcp.State {
				case tcpConntrackTimeWait, tcpConntrackClose:
					// Closed: a new connection on its tuple
					// is a new one to the kernel (queued).
					continue
				case tcpConntrackFinWait, tcpConntrackCloseWait, tcpConntrackLastAck:
					closing = true
				}
			}
			h.r.policy.Revoke(t, closing)
			cut[flowKeyOf(&f.Forward)] = true
		}
		if len(cut) == 0 {
			continue
		}
		n, err := nl.ConntrackDeleteFilters(netlink.ConntrackTable, fam, cut)
		if err != nil {
			errs = append(errs, fmt.Errorf("delete denied connections: %w", err))
		}
		total += int(n)
		h.revoked.Add(uint64(n))
	}
	return total, errors.Join(errs...)
}

// TCP states of the host's connection tracking
// (enum tcp_conntrack, include/uapi/linux/netfilter/nf_conntrack_tcp.h).
const (
	tcpConntrackFinWait   = 4
	tcpConntrackCloseWait = 5
	tcpConntrackLastAck   = 6
	tcpConntrackTimeWait  = 7
	tcpConntrackClose     = 8
)

// touches reports whether one of f's addresses is a host link's.
func touches(f *netlink.ConntrackFlow, local map[netip.Addr]bool) bool {
	for _, ip := range []net.IP{f.Forward.SrcIP, f.Forward.DstIP, f.Reverse.SrcIP, f.Reverse.DstIP} {
		if a, ok := netip.AddrFromSlice(ip); ok && local[a.Unmap()] {
			return true
		}
	}
	return false
}

// openingTuple returns the connection f as its first packet reached the
// pod's side: from its original source to the address and port the host
// translated its destination to (a Service's backend, a hostPort's pod).
func openingTuple(f *netlink.ConntrackFlow) (policy.Tuple, bool) {
	src, ok1 := netip.AddrFromSlice(f.Forward.SrcIP)
	dst, ok2 := netip.AddrFromSlice(f.Reverse.SrcIP)
	if !ok1 || !ok2 {
		return policy.Tuple{}, false
	}
	return policy.Tuple{Src: src.Unmap(), Dst: dst.Unmap(), SrcPort: f.Forward.SrcPort, DstPort: f.Reverse.SrcPort,
		Proto: f.Forward.Protocol}, true
}

// flowKey is a tracked connection's original tuple.
type flowKey struct {
	src, dst   netip.Addr
	sport, dpt uint16
	proto      uint8
}

func flowKeyOf(t *netlink.IPTuple) flowKey {
	s, _ := netip.AddrFromSlice(t.SrcIP)
	d, _ := netip.AddrFromSlice(t.DstIP)
	return flowKey{src: s.Unmap(), dst: d.Unmap(), sport: t.SrcPort, dpt: t.DstPort, proto: t.Protocol}
}

// flowSet matches the connections whose original tuple it holds.
type flowSet map[flowKey]bool

// MatchConntrackFlow implements netlink.CustomConntrackFilter.
func (s flowSet) MatchConntrackFlow(f *netlink.ConntrackFlow) bool { return s[flowKeyOf(&f.Forward)] }

// hostLinkAddrs returns the addresses of the host links.
func (r *Router) hostLinkAddrs() map[netip.Addr]bool {
	if m := r.hostAddrs.Load(); m != nil {
		return *m
	}
	return nil
}

// publishHostAddrsLocked publishes the host links' addresses for
// hostLinkAddrs, which the walker reads without mu.
//
// +checklocks:r.mu
func (r *Router) publishHostAddrsLocked() {
	m := map[netip.Addr]bool{}
	for _, addrs := range r.hostLinks {
		for _, a := range addrs {
			m[a] = true
		}
	}
	r.hostAddrs.Store(&m)
}
