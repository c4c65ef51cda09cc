package policy

import (
	"net/netip"
	"sync"
	"time"
)

// Fragments. A datagram larger than a link's MTU crosses the router in
// fragments, and only the first carries the transport header: ports, TCP
// flags, an echo's identifier. The enforcer judges a first fragment as
// any packet of its flow and, when it passes, remembers its datagram
// (addresses, protocol, IP identification) for fragTimeout; a later
// fragment of a remembered datagram passes. Any other later fragment is
// judged by what it has, its addresses and protocol: only a rule of every
// port lets it through. Linux's conntrack, which reassembles before it
// judges, sees the same: the whole datagram passes or none of it does.
// Without this a UDP datagram larger than the MTU to an allowed port
// (DNS answers with EDNS, for one) lost every fragment but its first.
//
// Fragments arriving before their first one are judged as any other later
// fragment (a pod's kernel sends them in order).

const (
	// fragShards stripes the table's locks.
	fragShards = 64
	// fragPerShard is how many datagrams a shard remembers, the oldest
	// forgotten first: 64 x 64 = 4096 datagrams in flight at once.
	fragPerShard = 64
	// fragTimeout is how long a datagram is remembered: Linux's
	// reassembly timeout (net.ipv4.ipfrag_time, 30 s).
	fragTimeout = int64(30 * time.Second)
)

// fragKey names one datagram.
type fragKey struct {
	src, dst netip.Addr
	id       uint32
	proto    uint8
}

func (f *Flow) fragKey() fragKey {
	return fragKey{src: f.Src, dst: f.Dst, id: f.fragID, proto: f.Proto}
}

type fragEntry struct {
	key     fragKey
	expires int64
}

type fragShard struct {
	mu sync.Mutex
	// +checklocks:mu
	entries [fragPerShard]fragEntry
	// next is the entry the next new datagram takes.
	// +checklocks:mu
	next int
}

// fragTable remembers the datagrams whose first fragment passed.
type fragTable struct {
	shards [fragShards]fragShard
}

func (k *fragKey) shard() int {
	s, d := k.src.As16(), k.dst.As16()
	return int((k.id ^ k.id>>16 ^ uint32(s[15]) ^ uint32(d[15])<<3 ^ uint32(k.proto)) % fragShards)
}

// add remembers k's datagram until now + fragTimeout.
func (t *fragTable) add(k fragKey, now int64) {
	sh := &t.shards[k.shard()]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for i := range sh.entries {
		if sh.entries[i].key == k {
			sh.entries[i].expires = now + fragTimeout
			return
		}
	}
	sh.entries[sh.next] = fragEntry{key: k, expires: now + fragTimeout}
	sh.next = (sh.next + 1) % fragPerShard
}

// passed reports whether k's datagram is remembered at now.
func (t *fragTable) passed(k fragKey, now int64) bool {
	sh := &t.shards[k.shard()]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for i := range sh.entries {
		if sh.entries[i].key == k {
			return now < sh.entries[i].expires
		}
	}
	return false
}
