package router

import (
	"hash/maphash"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/policy"
)

// Connections the host turns back into the router.
//
// A pod's connection to a Service leaves through the uplink; the host's
// kube-proxy translates the Service address to an endpoint's, and when that
// endpoint is a pod of this node the host sends the connection back through
// the uplink, its source still the client pod's. The endpoint's replies must
// go back the same way, through the host, whose connection tracking puts the
// Service address back as their source: delivered straight to the client,
// as any packet between two pods of the node is, they would reach a socket
// that never spoke to that address, and the client would drop them.
//
// The host used to see to that itself: the router's nftables table
// masqueraded such connections to the node gateway, so that their replies
// went to the host. But then the endpoint saw the node gateway as its
// client, and NetworkPolicy, which lets the node in, could not tell the pod
// behind it (Kubernetes' own NetworkPolicy tests probe through Services).
// So the router now remembers each connection the uplink brings from a
// local pod to a local pod (its tuple, the way the replies go) and sends
// the packets its endpoint sends back on that tuple, and ICMP errors about
// it, to the uplink instead of to the client. The endpoint sees its real
// client, whose egress rules and the endpoint's ingress rules both apply
// where the connection comes out of the uplink (policy.go).
//
// The table is bounded: at most hairpinMaxConns connections, at most
// hairpinClientShare of them from one client pod; a new connection beyond
// either is refused (its packets dropped and counted), never another's
// entry evicted. An entry lasts as long as the host's connection tracking
// keeps such a connection (Linux's defaults: five days for an established
// TCP connection, two minutes once it closes, three for the rest), renewed
// by every packet either way. Kube-proxy masquerades a pod's connection to
// a Service that picks the pod itself, so that one comes back from the node
// gateway and needs no entry. Without any entry a pod's packet costs one
// atomic load here.

// Bounds and timeouts of the hairpin table.
const (
	hairpinMaxConns    = 1 << 16
	hairpinClientShare = 1 << 13
	hairpinShards      = 64

	hairpinTCPEstablished = 5 * 24 * time.Hour
	hairpinTCPClosing     = 2 * time.Minute
	hairpinOther          = 3 * time.Minute
)

// hairpinEntry is one connection. Its fields change under no lock.
type hairpinEntry struct {
	// seen is when a packet of the connection last passed, in
	// nanoseconds since the table's epoch.
	seen atomic.Int64
	// closing is set once a FIN or RST passed.
	closing atomic.Bool
	// tcp says the connection is TCP. Immutable.
	tcp bool
}

// expired reports whether e outlived its timeout at now.
func (e *hairpinEntry) expired(now int64) bool {
	timeout := hairpinOther
	switch {
	case e.tcp && e.closing.Load():
		timeout = hairpinTCPClosing
	case e.tcp:
		timeout = hairpinTCPEstablished
	}
	return now-e.seen.Load() > int64(timeout)
}

// touch renews e at now, and notes a FIN or RST.
func (e *hairpinEntry) touch(now int64, tcpFlags uint8) {
	e.seen.Store(now)
	if e.tcp && tcpFlags&(uint8(header.TCPFlagFin)|uint8(header.TCPFlagRst)) != 0 && !e.closing.Load() {
		e.closing.Store(true)
	}
}

type hairpinShard struct {
	mu sync.RWMutex
	// m maps a connection's tuple the way its replies go (from the
	// endpoint to the client) to its entry. Guarded by mu.
	m map[policy.Tuple]*hairpinEntry
}

// hairpinTable is the router's table of connections the host turned back.
// Safe for concurrent use.
type hairpinTable struct {
	// n counts the entries of every shard.
	n      atomic.Int64
	seed   maphash.Seed
	epoch  time.Time
	shards [hairpinShards]hairpinShard
	// clientsMu guards clients, the entries by client address, touched
	// only when an entry comes or goes.
	clientsMu sync.Mutex
	clients   map[netip.Addr]int
	// up is the uplink's destination, nil while the router has none.
	up atomic.Pointer[fastDst]
	// Counters: connections remembered, refused for want of room, and
	// packets sent back to the host (and dropped when they could not be).
	added, refused, diverted, dropped atomic.Uint64
	// local reports whether an address is a local pod's. Immutable.
	local func(netip.Addr) bool
}

func newHairpinTable(local func(netip.Addr) bool) *hairpinTable {
	t := &hairpinTable{seed: maphash.MakeSeed(), epoch: time.Now(), clients: make(map[netip.Addr]int), local: local}
	for i := range t.shards {
		t.shards[i].m = make(map[policy.Tuple]*hairpinEntry)
	}
	return t
}

func (t *hairpinTable) now() int64 { return int64(time.Since(t.epoch)) }

func (t *hairpinTable) shard(k *policy.Tuple) *hairpinShard {
	var h maphash.Hash
	h.SetSeed(t.seed)
	a, b := k.Src.As16(), k.Dst.As16()
	h.Write(a[:])
	h.Write(b[:])
	h.WriteByte(byte(k.SrcPort))
	h.WriteByte(byte(k.SrcPort >> 8))
	h.WriteByte(byte(k.DstPort))
	h.WriteByte(byte(k.DstPort >> 8))
	h.WriteByte(k.Proto)
	return &t.shards[h.Sum64()%hairpinShards]
}

// flowOf reads the flow of pkt's first bytes, when it has ports.
func flowOf(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) (policy.Flow, bool) {
	if protocol != header.IPv4ProtocolNumber && protocol != header.IPv6ProtocolNumber {
		return policy.Flow{}, false
	}
	b, ok := pkt.Data().PullUp(min(pkt.Data().Size(), policyHeaderBytes))
	if !ok {
		return policy.Flow{}, false
	}
	return policy.ParseFlow(b)
}

// sourceOf returns the source address of pkt, an IPv4 or IPv6 packet.
func sourceOf(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) (netip.Addr, bool) {
	switch protocol {
	case header.IPv4ProtocolNumber:
		if b, ok := pkt.Data().PullUp(header.IPv4MinimumSize); ok {
			return netip.AddrFrom4([4]byte(b[ipv4SrcOffset : ipv4SrcOffset+4])), true
		}
	case header.IPv6ProtocolNumber:
		if b, ok := pkt.Data().PullUp(header.IPv6MinimumSize); ok {
			return netip.AddrFrom16([16]byte(b[ipv6SrcOffset : ipv6SrcOffset+16])), true
		}
	}
	return netip.Addr{}, false
}

// hasPorts reports whether proto is a transport protocol Services carry.
func hasPorts(proto uint8) bool {
	return proto == uint8(header.TCPProtocolNumber) || proto == uint8(header.UDPProtocolNumber) || proto == sctpProtocol
}

// sctpProtocol is SCTP's IP protocol number.
const sctpProtocol = 132

// fromUplink notes pkt, which the uplink delivers, when it is a packet from
// a local pod to a local pod (see above), and reports whether it may pass:
// false when its connection is new and the table has no room for it.
func (t *hairpinTable) fromUplink(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	// Most of what the host sends is not from a local pod: its source
	// address alone says so, before the whole flow is parsed.
	if src, ok := sourceOf(protocol, pkt); !ok || !t.local(src) {
		return true
	}
	f, ok := flowOf(protocol, pkt)
	if !ok || !f.Ports || !hasPorts(f.Proto) || !t.local(f.Src) || !t.local(f.Dst) {
		return true
	}
	k := policy.Tuple{Src: f.Dst, Dst: f.Src, SrcPort: f.DstPort, DstPort: f.SrcPort, Proto: f.Proto}
	now := t.now()
	s := t.shard(&k)
	s.mu.RLock()
	e := s.m[k]
	s.mu.RUnlock()
	if e != nil {
		e.touch(now, f.TCPFlags)
		return true
	}
	return t.insert(s, k, f.TCPFlags, now)
}

// insert adds k, a new connection of the client k.Dst, to s, after
// letting go of a few expired entries there.
func (t *hairpinTable) insert(s *hairpinShard, k policy.Tuple, tcpFlags uint8, now int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.m[k]; e != nil {
		e.touch(now, tcpFlags)
		return true
	}
	t.sweepLocked(s, now, 8)
	t.clientsMu.Lock()
	if t.n.Load() >= hairpinMaxConns || t.clients[k.Dst] >= hairpinClientShare {
		t.clientsMu.Unlock()
		t.refused.Add(1)
		return false
	}
	t.clients[k.Dst]++
	t.clientsMu.Unlock()
	e := &hairpinEntry{tcp: k.Proto == uint8(header.TCPProtocolNumber)}
	e.touch(now, tcpFlags)
	s.m[k] = e
	t.n.Add(1)
	t.added.Add(1)
	return true
}

// sweepLocked deletes up to max expired entries of s (all when max < 0).
//
// +checklocks:s.mu
func (t *hairpinTable) sweepLocked(s *hairpinShard, now int64, max int) {
	seen := 0
	for k, e := range s.m {
		if max >= 0 && seen == max {
			return
		}
		seen++
		if !e.expired(now) {
			continue
		}
		delete(s.m, k)
		t.n.Add(-1)
		t.clientsMu.Lock()
		if t.clients[k.Dst]--; t.clients[k.Dst] <= 0 {
			delete(t.clients, k.Dst)
		}
		t.clientsMu.Unlock()
	}
}

// expire deletes every expired entry.
func (t *hairpinTable) expire() {
	now := t.now()
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		t.sweepLocked(s, now, -1)
		s.mu.Unlock()
	}
}

// reply reports whether pkt, which a pod sent, answers a connection the
// host turned back to it (or is an ICMP error about one): it must go to the
// host.
func (t *hairpinTable) reply(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	if t.n.Load() == 0 {
		return false
	}
	f, ok := flowOf(protocol, pkt)
	if !ok {
		return false
	}
	k := f.Tuple
	switch {
	case f.Error:
		// About a packet the client sent to the endpoint.
		k = policy.Tuple{Src: f.Inner.Dst, Dst: f.Inner.Src, SrcPort: f.Inner.DstPort, DstPort: f.Inner.SrcPort, Proto: f.Inner.Proto}
	case !f.Ports:
		return false
	}
	if !hasPorts(k.Proto) {
		return false
	}
	s := t.shard(&k)
	s.mu.RLock()
	e := s.m[k]
	s.mu.RUnlock()
	if e == nil {
		return false
	}
	if !f.Error {
		e.touch(t.now(), f.TCPFlags)
	}
	return true
}

// hairpinEndpoint wraps the uplink's endpoint: what it delivers passes the
// hairpin table (fromUplink) before the stack sees it.
type hairpinEndpoint struct {
	nested.Endpoint
	// table is the router's. Immutable.
	table *hairpinTable
}

var _ stack.LinkEndpoint = (*hairpinEndpoint)(nil)
var _ stack.NetworkDispatcher = (*hairpinEndpoint)(nil)

func newHairpinEndpoint(ep stack.LinkEndpoint, t *hairpinTable) *hairpinEndpoint {
	h := &hairpinEndpoint{table: t}
	h.Endpoint.Init(ep, h)
	return h
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (h *hairpinEndpoint) DeliverNetworkPacket(protocol tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if !h.table.fromUplink(protocol, pkt) {
		return
	}
	h.Endpoint.DeliverNetworkPacket(protocol, pkt)
}

// HairpinStats are the hairpin table's counters.
type HairpinStats struct {
	// Conns is how many connections the table holds; Added how many it
	// took in all, Refused how many it had no room for.
	Conns          int64
	Added, Refused uint64
	// Diverted counts the packets sent back to the host, Dropped those
	// that could not be (no uplink, or headers the router does not
	// forward).
	Diverted, Dropped uint64
}

// HairpinStats returns the hairpin table's counters.
func (r *Router) HairpinStats() HairpinStats {
	t := r.fast.hairpin
	return HairpinStats{
		Conns: t.n.Load(), Added: t.added.Load(), Refused: t.refused.Load(),
		Diverted: t.diverted.Load(), Dropped: t.dropped.Load(),
	}
}
