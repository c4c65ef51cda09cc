package policy

import (
	"net/netip"
	"slices"
	"sync/atomic"
)

// Enforcer decides, packet by packet, what policy lets through: the
// current snapshot (swapped atomically; nil means no policy) and the
// connection tracker. Safe for concurrent use.
type Enforcer struct {
	snap atomic.Pointer[Snapshot]
	// ct is the connection tracker. Immutable pointer.
	ct *Tracker
	// frags remembers the datagrams whose first fragment passed.
	frags fragTable
	// nodeAddrs are the node's addresses the enforcer's owner knows
	// itself (the router's node gateways), beside the snapshot's.
	// Immutable.
	nodeAddrs []netip.Addr
	// log, when set, logs why packets are denied (LogDenials).
	log atomic.Pointer[denyLog]
}

// NewEnforcer returns an enforcer without policy whose tracker is bounded
// by cfg; nodeAddrs are node addresses that may always reach a local pod.
func NewEnforcer(cfg TrackerConfig, nodeAddrs []netip.Addr) (*Enforcer, error) {
	ct, err := NewTracker(cfg)
	if err != nil {
		return nil, err
	}
	return &Enforcer{ct: ct, nodeAddrs: slices.Clone(nodeAddrs)}, nil
}

// Set installs s; nil removes every policy. Connections tracked under the
// previous snapshot are checked against s at their next packet.
func (e *Enforcer) Set(s *Snapshot) { e.snap.Store(s) }

// Snapshot returns the installed snapshot, or nil.
func (e *Enforcer) Snapshot() *Snapshot { return e.snap.Load() }

// Tracker returns the connection tracker.
func (e *Enforcer) Tracker() *Tracker { return e.ct }

// FromPod reports whether a packet a local pod sent may pass; ip holds
// its first bytes (see ParseFlow). The caller has checked that its source
// is the pod's (the router's anti-spoofing filter runs first).
func (e *Enforcer) FromPod(ip []byte) bool {
	s := e.snap.Load()
	if s == nil {
		return true
	}
	return e.check(s, ip, true, true)
}

// FromUplink reports whether a packet from the host or beyond (the
// router's uplink) may pass; only packets for a local pod are checked.
func (e *Enforcer) FromUplink(ip []byte) bool {
	s := e.snap.Load()
	if s == nil {
		return true
	}
	return e.check(s, ip, false, true)
}

// FromHostLink reports whether a packet the host's kernel queued may pass:
// one of a connection its connection tracking does not know, from a local
// pod the host routes (fromPod; a veth link, whose source the host checked)
// or to one. It is judged as FromPod or FromUplink judge it, but a
// connection it lets through is not tracked here: the kernel tracks it.
// The enforcer remembers only the connections Revoke denied.
func (e *Enforcer) FromHostLink(ip []byte, fromPod bool) bool {
	s := e.snap.Load()
	if s == nil {
		return true
	}
	return e.check(s, ip, fromPod, false)
}

// Allows reports whether the connection t opened may be open under the
// installed snapshot (the node addresses the enforcer was given included).
func (e *Enforcer) Allows(t Tuple) bool {
	s := e.snap.Load()
	if s == nil {
		return true
	}
	return e.allowsNew(s, &t)
}

// Revoke records that the connection orig opened, which the host's kernel
// tracked until now, is denied under the installed snapshot: once the
// kernel forgets it, its packets come to FromHostLink again and are
// dropped, both ways, until it falls silent for its timeout or a later
// snapshot allows it again, as a connection the router tracked is;
// closing: a TCP connection that was closing (the timeout of one). It
// reports false when the tracker has no room for it (its packets are then
// judged afresh) or no snapshot is installed.
func (e *Enforcer) Revoke(orig Tuple, closing bool) bool {
	s := e.snap.Load()
	if s == nil {
		return false
	}
	owner := s.pods[orig.Src]
	if owner == nil {
		owner = s.pods[orig.Dst]
	}
	if owner == nil {
		owner = s.source(&orig)
	}
	if owner == nil {
		return false
	}
	return e.ct.revoke(orig, closing, owner.owner, s)
}

// check judges a packet; track: a connection it lets through is tracked.
func (e *Enforcer) check(s *Snapshot, ip []byte, fromPod, track bool) bool {
	f, ok := ParseFlow(ip)
	if !f.Src.IsValid() || !f.Dst.IsValid() {
		return true // not IP: the stack drops it
	}
	if f.Dst.IsLinkLocalUnicast() || f.Dst.IsMulticast() || f.Dst == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return true // for the router itself (NDP, the gateway), never forwarded
	}
	sp, dp := s.pods[f.Src], s.pods[f.Dst]
	if !fromPod && dp == nil {
		return true
	}
	if !sp.isolated() && !dp.isolated() && !s.remoteIsolated(f.Src, f.Dst) {
		return true
	}
	if sp == nil {
		sp = s.source(&f.Tuple)
	}
	if !ok {
		// Headers that do not parse, between pods policy isolates.
		e.denyEither(s, &f, sp, dp, DenyMalformed)
		return false
	}
	if f.Error {
		if e.ct.related(f.Inner) {
			return true
		}
		e.denyEither(s, &f, sp, dp, DenyUntrackedError)
		return false // about nothing tracked, or a connection denied
	}
	if f.frag == fragLater && e.frags.passed(f.fragKey(), e.ct.now()) {
		return true // its datagram's first fragment passed
	}
	if (f.Proto == ProtoTCP || f.Proto == ProtoUDP || f.Proto == ProtoSCTP) && !f.Ports {
		// A later fragment of a datagram not seen to pass: no ports
		// to track it by; a rule of every port may let it through.
		if by, dir := e.decide(s, &f.Tuple, false); by != nil {
			e.deny(s, &f, by, dir, DenyNoRule)
			return false
		}
		return true
	}
	var orig Tuple
	switch e.ct.lookup(&f, s, e, &orig) {
	case hit:
		e.fragPassed(&f)
		return true
	case denied:
		// Counted against the pod whose policy denies the connection
		// (its opening tuple), whichever way this packet goes.
		if by, dir := e.decide(s, &orig, orig.Proto == ProtoTCP || orig.Proto == ProtoUDP || orig.Proto == ProtoSCTP); by != nil {
			e.deny(s, &f, by, dir, DenyEarlier)
		} else {
			e.denyEither(s, &f, sp, dp, DenyEarlier)
		}
		return false
	}
	orig = f.Tuple
	if by, dir := e.decide(s, &orig, f.Ports); by != nil {
		// A TCP segment without SYN may belong to a connection opened
		// before its pod was isolated or before the tracker knew it:
		// it passes, and is tracked, if the connection the other way
		// may open. Without a SYN it opens nothing.
		rev := orig.reverse()
		if rby, _ := e.decide(s, &rev, true); f.Proto != ProtoTCP || f.TCPFlags&tcpSyn != 0 || rby != nil {
			e.deny(s, &f, by, dir, DenyNoRule)
			return false
		}
		orig = rev
	}
	if !track {
		e.fragPassed(&f)
		return true
	}
	owner := s.pods[orig.Src]
	if owner == nil {
		owner = s.pods[orig.Dst]
	}
	if owner == nil {
		owner = sp
		if owner == nil {
			owner = dp
		}
	}
	if !e.ct.insert(orig, f.TCPFlags, owner.owner, s) {
		// Counted as refused, not denied: policy allowed it.
		if l := e.log.Load(); l != nil {
			dir := Egress
			if owner != s.pods[orig.Src] {
				dir = Ingress
			}
			l.denied(e, s, &f, owner, dir, DenyTrackerFull)
		}
		return false
	}
	e.fragPassed(&f)
	return true
}

// fragPassed remembers f's datagram when f is its first fragment, so that
// its later fragments pass (frag.go).
func (e *Enforcer) fragPassed(f *Flow) {
	if f.frag == fragFirst {
		e.frags.add(f.fragKey(), e.ct.now())
	}
}

// decide returns nil when a connection t (ports: it has ports to match)
// may open under s, or the pod whose policy denies it and in which
// direction.
func (e *Enforcer) decide(s *Snapshot, t *Tuple, ports bool) (*Pod, Direction) {
	return s.decide(t, ports, e.nodeAddrs)
}

// allowsNew implements checker: whether a tracked connection, opened by
// t, may still be open under s.
func (e *Enforcer) allowsNew(s *Snapshot, t *Tuple) bool {
	ports := t.Proto == ProtoTCP || t.Proto == ProtoUDP || t.Proto == ProtoSCTP
	by, _ := e.decide(s, t, ports)
	return by == nil
}

// DenyReason is why the enforcer denied a packet.
type DenyReason uint8

// Reasons a packet is denied.
const (
	// DenyNoRule: its pod is isolated in its direction and no rule of
	// the policies selecting it there allows the packet.
	DenyNoRule DenyReason = iota
	// DenyEarlier: the packet belongs to a tracked connection that a
	// newer snapshot denies.
	DenyEarlier
	// DenyUntrackedError: an ICMP error about no tracked connection.
	DenyUntrackedError
	// DenyMalformed: headers that do not parse.
	DenyMalformed
	// DenyTrackerFull: policy allows the connection but the tracker
	// has no room for it (counted as refused, not denied).
	DenyTrackerFull
)

// String returns the reason as the debug log gives it.
func (r DenyReason) String() string {
	switch r {
	case DenyNoRule:
		return "no rule allows it"
	case DenyEarlier:
		return "connection denied earlier"
	case DenyUntrackedError:
		return "untracked ICMP error"
	case DenyMalformed:
		return "headers do not parse"
	case DenyTrackerFull:
		return "tracker full"
	}
	return "unknown"
}

// denyEither denies a packet that no rule was looked up for against the
// isolated pod it was for: its sender's egress, else its receiver's
// ingress, else the pod of the two that is isolated at all.
func (e *Enforcer) denyEither(s *Snapshot, f *Flow, sp, dp *Pod, why DenyReason) {
	switch {
	case sp != nil && sp.tables[Egress] != nil:
		e.deny(s, f, sp, Egress, why)
	case dp != nil && dp.tables[Ingress] != nil:
		e.deny(s, f, dp, Ingress, why)
	case sp != nil:
		e.deny(s, f, sp, Egress, why)
	case dp != nil:
		e.deny(s, f, dp, Ingress, why)
	}
}

// deny counts a packet denied to or from p in d, against p and the
// policies isolating it in d, and logs it when LogDenials is on.
func (e *Enforcer) deny(s *Snapshot, f *Flow, p *Pod, d Direction, why DenyReason) {
	p.owner.denied[d].Add(1)
	if g := p.groups[d]; g != nil {
		g.n.Add(1)
	}
	if l := e.log.Load(); l != nil {
		l.denied(e, s, f, p, d, why)
	}
}

// PolicyCounts returns the counters of the policies that isolate a local
// pod under the installed snapshot, sorted by namespace and name.
func (e *Enforcer) PolicyCounts() []PolicyCounts {
	s := e.snap.Load()
	if s == nil || s.stats == nil {
		return nil
	}
	return s.stats.counts()
}

// PodCounts are one local pod's policy counters.
type PodCounts struct {
	Namespace, Pod string
	// Denied counts the packets policy denied, by Direction.
	Denied [2]uint64
	// Refused counts new connections the tracker had no room for.
	Refused uint64
	// Conns is how many tracked connections are charged to the pod.
	Conns int
}

// Counts returns the counters of the installed snapshot's pods, sorted.
func (e *Enforcer) Counts() []PodCounts {
	s := e.snap.Load()
	if s == nil {
		return nil
	}
	var out []PodCounts
	for _, p := range s.Pods() {
		out = append(out, PodCounts{
			Namespace: p.Namespace, Pod: p.Name,
			Denied:  [2]uint64{p.owner.denied[Ingress].Load(), p.owner.denied[Egress].Load()},
			Refused: p.owner.refused.Load(),
			Conns:   p.owner.Owned(),
		})
	}
	return out
}
