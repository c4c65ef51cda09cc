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
	// nodeAddrs are the node's addresses the enforcer's owner knows
	// itself (the router's node gateways), beside the snapshot's.
	// Immutable.
	nodeAddrs []netip.Addr
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
	return e.check(s, ip, true)
}

// FromUplink reports whether a packet from the host or beyond (the
// router's uplink) may pass; only packets for a local pod are checked.
func (e *Enforcer) FromUplink(ip []byte) bool {
	s := e.snap.Load()
	if s == nil {
		return true
	}
	return e.check(s, ip, false)
}

func (e *Enforcer) check(s *Snapshot, ip []byte, fromPod bool) bool {
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
		e.count(sp, dp)
		return false
	}
	if f.Error {
		if e.ct.related(f.Inner) {
			return true
		}
		e.count(sp, dp)
		return false // about nothing tracked, or a connection denied
	}
	if (f.Proto == ProtoTCP || f.Proto == ProtoUDP || f.Proto == ProtoSCTP) && !f.Ports {
		// A later fragment: no ports to track it by; a rule of every
		// port may let it through.
		by, _ := e.decide(s, &f.Tuple, false)
		return by == nil
	}
	switch e.ct.lookup(&f, s, e) {
	case hit:
		return true
	case denied:
		e.count(sp, dp)
		return false
	}
	orig := f.Tuple
	if by, dir := e.decide(s, &orig, f.Ports); by != nil {
		// A TCP segment without SYN may belong to a connection opened
		// before its pod was isolated or before the tracker knew it:
		// it passes, and is tracked, if the connection the other way
		// may open. Without a SYN it opens nothing.
		rev := orig.reverse()
		if rby, _ := e.decide(s, &rev, true); f.Proto != ProtoTCP || f.TCPFlags&tcpSyn != 0 || rby != nil {
			by.owner.denied[dir].Add(1)
			return false
		}
		orig = rev
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
	return e.ct.insert(orig, f.TCPFlags, owner.owner, s)
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

// count counts a denied packet against the isolated pod it was for.
func (e *Enforcer) count(sp, dp *Pod) {
	switch {
	case sp != nil && sp.tables[Egress] != nil:
		sp.owner.denied[Egress].Add(1)
	case dp != nil && dp.tables[Ingress] != nil:
		dp.owner.denied[Ingress].Add(1)
	case sp != nil:
		sp.owner.denied[Egress].Add(1)
	case dp != nil:
		dp.owner.denied[Ingress].Add(1)
	}
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
