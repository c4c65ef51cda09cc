package policy

import (
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// TrackerConfig bounds the connection tracker.
type TrackerConfig struct {
	// MaxConns is the most connections tracked at once, all pods
	// together. Each costs about 200 bytes (the entry, 96, and its map
	// slot with the key, about 80 at the map's load): 131072 of them
	// about 25 MiB.
	MaxConns int
	// PodShare is the most connections charged to one pod; a pod at its
	// share replaces its own unanswered connections, or its new ones are
	// refused, never another pod's.
	PodShare int
	// Timeouts: a connection expires after this long without a packet.
	// TCPEstablished for TCP answered and not closing; TCPClosing once a
	// FIN or RST passed; Unreplied for any connection not answered yet
	// (a SYN, a datagram); Datagram for answered UDP and SCTP; ICMP for
	// echo.
	TCPEstablished, TCPClosing, Unreplied, Datagram, ICMP time.Duration
}

// DefaultTrackerConfig is the tracker's configuration unless told
// otherwise: 131072 connections (2^17, ~25 MiB), 16384 (1/8) a pod;
// timeouts of Cilium's connection tracker (6 h TCP, 10 s closing) and of
// Linux's conntrack for the rest (30 s unreplied, 120 s a UDP stream,
// 30 s ICMP).
var DefaultTrackerConfig = TrackerConfig{
	MaxConns:       1 << 17,
	PodShare:       1 << 14,
	TCPEstablished: 6 * time.Hour,
	TCPClosing:     10 * time.Second,
	Unreplied:      30 * time.Second,
	Datagram:       120 * time.Second,
	ICMP:           30 * time.Second,
}

// Validate checks the limits.
func (c TrackerConfig) Validate() error {
	var errs []error
	if c.MaxConns < 1 || c.PodShare < 1 || c.PodShare > c.MaxConns {
		errs = append(errs, errors.New("conntrack: need 1 <= PodShare <= MaxConns"))
	}
	for _, d := range []time.Duration{c.TCPEstablished, c.TCPClosing, c.Unreplied, c.Datagram, c.ICMP} {
		if d <= 0 {
			errs = append(errs, errors.New("conntrack: every timeout must be positive"))
			break
		}
	}
	return errors.Join(errs...)
}

// numShards is the tracker's lock striping: 256 shards, so that links'
// goroutines on different flows rarely meet on one lock.
const numShards = 256

// sweepBatch is how many entries an insert looks at for expired ones, and
// how far a pod at its share looks for one of its own to replace.
const (
	sweepBatch   = 8
	replaceBatch = 64
)

// connKey is a connection's tuple in canonical order (the smaller
// endpoint first), so that both directions find it.
type connKey struct {
	a, b   netip.Addr
	pa, pb uint16
	proto  uint8
}

func canonical(t Tuple) connKey {
	c := t.Src.Compare(t.Dst)
	if c < 0 || (c == 0 && t.SrcPort <= t.DstPort) {
		return connKey{a: t.Src, b: t.Dst, pa: t.SrcPort, pb: t.DstPort, proto: t.Proto}
	}
	return connKey{a: t.Dst, b: t.Src, pa: t.DstPort, pb: t.SrcPort, proto: t.Proto}
}

func (k connKey) shard() int {
	a, b := addrNum(k.a), addrNum(k.b)
	h := a.hi ^ a.lo*0x9e3779b97f4a7c15 ^ b.hi*0xc2b2ae3d27d4eb4f ^ b.lo ^ uint64(k.pa)<<32 ^ uint64(k.pb)<<16 ^ uint64(k.proto)
	h ^= h >> 29
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 32
	return int(h % numShards)
}

// conn is one tracked connection. Its fields are guarded by its shard's
// mutex.
type conn struct {
	// orig is the tuple of the packet that opened it.
	orig  Tuple
	owner *Owner
	// gen is the snapshot generation it was last allowed under.
	gen uint64
	// expires is when it expires, in the tracker's clock.
	expires int64
	replied bool // a packet went the other way
	closing bool // a FIN or RST passed
	// denied says the snapshot it was last checked under denies it: its
	// packets are dropped, both ways, until it expires (each of them
	// keeps it) or a later snapshot allows it again. Kept rather than
	// removed so that its packets are not judged afresh as a connection
	// the other way, which policy may allow.
	denied bool
}

type shard struct {
	mu sync.Mutex
	// +checklocks:mu
	m map[connKey]*conn
	_ [48]byte // 64 bytes in all: a cache line of its own
}

// Tracker tracks the connections the enforcer allowed, so that their
// replies pass. Safe for concurrent use; each lookup locks one of
// numShards shards.
type Tracker struct {
	cfg    TrackerConfig
	now    func() int64 // nanoseconds, monotonic
	total  atomic.Int64
	shards [numShards]shard
}

// NewTracker returns a tracker bounded by cfg.
func NewTracker(cfg TrackerConfig) (*Tracker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	base := time.Now()
	t := &Tracker{cfg: cfg, now: func() int64 { return int64(time.Since(base)) }}
	for i := range t.shards {
		t.shards[i].m = map[connKey]*conn{}
	}
	return t, nil
}

// Len returns how many connections are tracked.
func (t *Tracker) Len() int { return int(t.total.Load()) }

// Owned returns how many connections are charged to o.
func (o *Owner) Owned() int { return int(o.conns.Load()) }

// checker decides whether a connection may open under a snapshot.
type checker interface {
	allowsNew(s *Snapshot, t *Tuple) bool
}

// verdict is a tracker lookup's answer.
type verdict uint8

const (
	miss   verdict = iota // not tracked
	hit                   // tracked and allowed
	denied                // tracked, and no longer allowed
)

// lookup finds f's connection and, when found, refreshes it with f. A
// connection allowed under an older snapshot than s is checked again
// (recheck, with its opening tuple): still allowed, it carries on; denied,
// it is marked so, and lookup says so for its packets from then on,
// setting *orig to its opening tuple.
func (t *Tracker) lookup(f *Flow, s *Snapshot, recheck checker, orig *Tuple) verdict {
	k := canonical(f.Tuple)
	sh := &t.shards[k.shard()]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	c := sh.m[k]
	if c == nil {
		return miss
	}
	now := t.now()
	fromOrig := f.Src == c.orig.Src && f.SrcPort == c.orig.SrcPort
	if now >= c.expires || (f.TCPFlags&(tcpSyn|tcpAck) == tcpSyn && !fromOrig) {
		// Expired, or the other side opens a connection of its own on
		// the tuple: judged afresh.
		t.removeLocked(sh, k, c)
		return miss
	}
	if c.gen != s.gen {
		c.denied = !recheck.allowsNew(s, &c.orig)
		c.gen = s.gen
	}
	if f.TCPFlags&(tcpSyn|tcpAck) == tcpSyn && c.closing {
		// The tuple opens again (a port reused after TIME-WAIT): a
		// new connection, not yet answered.
		c.closing, c.replied = false, false
	}
	if !fromOrig {
		c.replied = true
	}
	if f.TCPFlags&(tcpFin|tcpRst) != 0 {
		c.closing = true
	}
	c.expires = now + int64(t.timeout(c))
	if c.denied {
		*orig = c.orig
		return denied
	}
	return hit
}

// related reports whether inner, the packet an ICMP error quotes, belongs
// to a tracked connection (it went the other way: the error's sender got
// it).
func (t *Tracker) related(inner Tuple) bool {
	k := canonical(inner)
	sh := &t.shards[k.shard()]
	sh.mu.Lock()
	c := sh.m[k]
	ok := c != nil && !c.denied && t.now() < c.expires
	sh.mu.Unlock()
	return ok
}

func (t *Tracker) timeout(c *conn) time.Duration {
	switch {
	case !c.replied:
		return t.cfg.Unreplied
	case c.orig.Proto == ProtoTCP && c.closing:
		return t.cfg.TCPClosing
	case c.orig.Proto == ProtoTCP:
		return t.cfg.TCPEstablished
	case c.orig.Proto == ProtoICMP || c.orig.Proto == ProtoICMPv6:
		return t.cfg.ICMP
	}
	return t.cfg.Datagram
}

// +checklocks:sh.mu
func (t *Tracker) removeLocked(sh *shard, k connKey, c *conn) {
	delete(sh.m, k)
	c.owner.conns.Add(-1)
	t.total.Add(-1)
}

// insert tracks the connection opened by orig (a packet with TCP flags
// flags), charged to owner, allowed under s. It reports false when there is no room: the pod is at its
// share and has no unanswered connection in the shard to replace, or the
// table is full of live connections.
func (t *Tracker) insert(orig Tuple, flags uint8, owner *Owner, s *Snapshot) bool {
	if !t.put(&conn{orig: orig, owner: owner, gen: s.gen, closing: flags&(tcpFin|tcpRst) != 0}) {
		owner.refused.Add(1)
		return false
	}
	return true
}

// revoke tracks the connection orig opened (closing: a TCP connection
// closing) as denied under s, charged to owner (see Enforcer.Revoke); a
// tracked one is marked so. It reports false when there is no room for it.
func (t *Tracker) revoke(orig Tuple, closing bool, owner *Owner, s *Snapshot) bool {
	// It was answered (the kernel tracked it): the timeout of an open
	// connection of its protocol.
	return t.put(&conn{orig: orig, owner: owner, gen: s.gen, replied: true, closing: closing, denied: true})
}

// put tracks c, charged to c.owner, when there is room: expired entries of
// its shard swept first, one of the owner's unanswered connections
// replaced when it is at its share. A connection tracked already (another
// packet of it raced, or the router tracks what the kernel tracked too)
// takes c's generation and verdict instead.
func (t *Tracker) put(c *conn) bool {
	k := canonical(c.orig)
	sh := &t.shards[k.shard()]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	now := t.now()
	if old := sh.m[k]; old != nil {
		old.gen, old.denied = c.gen, c.denied
		old.expires = now + int64(t.timeout(old))
		return true
	}
	t.sweepLocked(sh, now)
	if c.owner.conns.Load() >= int64(t.cfg.PodShare) && !t.replaceLocked(sh, c.owner) {
		return false
	}
	if t.total.Load() >= int64(t.cfg.MaxConns) {
		return false
	}
	c.expires = now + int64(t.timeout(c))
	sh.m[k] = c
	c.owner.conns.Add(1)
	t.total.Add(1)
	return true
}

// sweepLocked removes the expired among a few of sh's entries (Go's map
// iteration starts at a random place, so every entry's turn comes).
//
// +checklocks:sh.mu
func (t *Tracker) sweepLocked(sh *shard, now int64) {
	n := 0
	for k, c := range sh.m {
		if now >= c.expires {
			t.removeLocked(sh, k, c)
		}
		if n++; n >= sweepBatch {
			return
		}
	}
}

// replaceLocked removes one of owner's unanswered connections in sh, if
// it finds one among replaceBatch entries: a pod flooding new flows
// replaces its own, as Linux's early drop does.
//
// +checklocks:sh.mu
func (t *Tracker) replaceLocked(sh *shard, owner *Owner) bool {
	n := 0
	for k, c := range sh.m {
		if c.owner == owner && !c.replied {
			t.removeLocked(sh, k, c)
			return true
		}
		if n++; n >= replaceBatch {
			return false
		}
	}
	return false
}

// Expire removes every expired connection; the enforcer's owner may call
// it now and then to give memory back between bursts.
func (t *Tracker) Expire() {
	now := t.now()
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		for k, c := range sh.m {
			if now >= c.expires {
				t.removeLocked(sh, k, c)
			}
		}
		sh.mu.Unlock()
	}
}
