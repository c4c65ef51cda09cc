package endpoint

import "sync/atomic"

// Stats are a link endpoint's counters. Every field is updated atomically and
// may be read at any time, for example by a metrics collector.
type Stats struct {
	// RxPackets and RxBytes count frames received from the peer and
	// delivered to the stack.
	RxPackets atomic.Uint64
	RxBytes   atomic.Uint64
	// TxPackets and TxBytes count frames handed to the peer.
	TxPackets atomic.Uint64
	TxBytes   atomic.Uint64
	// RxDrops counts frames from the peer that were dropped: malformed,
	// oversized, or arriving while the endpoint is not attached.
	RxDrops atomic.Uint64
	// TxDrops counts frames for the peer that were dropped because its queue
	// was full (no posted buffers, no descriptor space) or the link was down.
	TxDrops atomic.Uint64
	// TxWaits counts frames that found the peer's queue full and waited
	// for room before they were sent or dropped: back-pressure the writer
	// met (a client waits, a server drops at once).
	TxWaits atomic.Uint64
	// Violations counts protocol violations by the peer: descriptors or
	// ring headers that point outside the peer's own region or break the
	// ring's rules. A violation cuts the peer off.
	Violations atomic.Uint64
	// RxThrottled counts the receiver's pauses for its RxLimit: the
	// peer sent faster than its budget.
	RxThrottled atomic.Uint64
	// TxOneCopy counts the frames of TxPackets that were copied to the
	// peer straight from another peer's shared memory (shm's direct.go).
	TxOneCopy atomic.Uint64
}

// StatsSnapshot is a plain copy of Stats.
type StatsSnapshot struct {
	RxPackets, RxBytes, TxPackets, TxBytes uint64
	RxDrops, TxDrops, TxWaits, Violations  uint64
	RxThrottled, TxOneCopy                 uint64
}

// Snapshot returns a copy of the counters.
func (s *Stats) Snapshot() StatsSnapshot {
	return StatsSnapshot{
		RxPackets:   s.RxPackets.Load(),
		RxBytes:     s.RxBytes.Load(),
		TxPackets:   s.TxPackets.Load(),
		TxBytes:     s.TxBytes.Load(),
		RxDrops:     s.RxDrops.Load(),
		TxDrops:     s.TxDrops.Load(),
		TxWaits:     s.TxWaits.Load(),
		Violations:  s.Violations.Load(),
		RxThrottled: s.RxThrottled.Load(),
		TxOneCopy:   s.TxOneCopy.Load(),
	}
}

// Add returns the sums of s's and o's counters (a link's sessions, say).
func (s StatsSnapshot) Add(o StatsSnapshot) StatsSnapshot {
	return StatsSnapshot{
		RxPackets: s.RxPackets + o.RxPackets, RxBytes: s.RxBytes + o.RxBytes,
		TxPackets: s.TxPackets + o.TxPackets, TxBytes: s.TxBytes + o.TxBytes,
		RxDrops: s.RxDrops + o.RxDrops, TxDrops: s.TxDrops + o.TxDrops,
		TxWaits:     s.TxWaits + o.TxWaits,
		Violations:  s.Violations + o.Violations,
		RxThrottled: s.RxThrottled + o.RxThrottled,
		TxOneCopy:   s.TxOneCopy + o.TxOneCopy,
	}
}
