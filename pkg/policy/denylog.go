package policy

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// Debug lines for denied packets, rate-limited: a pod sending what its
// policies deny must not flood the agent's log. DenyLogRate lines a second
// (DenyLogBurst at once) are enough to see what a pod is refused.
const (
	DenyLogRate  = 10
	DenyLogBurst = 20
)

// denyLog writes one debug line per denied packet, within its token
// bucket; the next line written says how many it suppressed meanwhile.
type denyLog struct {
	log *slog.Logger // immutable
	now func() time.Time
	mu  sync.Mutex
	// tokens is the bucket (at most DenyLogBurst), refilled at
	// DenyLogRate a second since last.
	// +checklocks:mu
	tokens float64
	// +checklocks:mu
	last time.Time
	// suppressed counts the lines not written since the last one.
	// +checklocks:mu
	suppressed uint64
}

// LogDenials makes e log, at debug level on log, each packet it denies:
// its flow, the local pod and direction it was denied for, the policies
// isolating that pod there, and why no rule matched (or that it belongs to
// a connection denied earlier, is an untracked ICMP error, has headers
// that do not parse, or found the tracker full). At most DenyLogRate lines
// a second (DenyLogBurst at once); the next line says how many were
// suppressed. A nil log, or one not enabled for debug, turns it off: a
// denied packet then costs one atomic load more, an allowed one nothing.
func (e *Enforcer) LogDenials(log *slog.Logger) {
	if log == nil || !log.Enabled(context.Background(), slog.LevelDebug) {
		e.log.Store(nil)
		return
	}
	e.log.Store(&denyLog{log: log, now: time.Now, tokens: DenyLogBurst})
}

// take reports whether a line may be written now, and how many were
// suppressed before it.
func (l *denyLog) take() (bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if !l.last.IsZero() {
		l.tokens = min(DenyLogBurst, l.tokens+now.Sub(l.last).Seconds()*DenyLogRate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return false, 0
	}
	l.tokens--
	n := l.suppressed
	l.suppressed = 0
	return true, n
}

// denied logs f, denied to or from p in d for why.
func (l *denyLog) denied(e *Enforcer, s *Snapshot, f *Flow, p *Pod, d Direction, why DenyReason) {
	ok, suppressed := l.take()
	if !ok {
		return
	}
	attrs := []any{
		"flow", flowString(&f.Tuple, f.Ports),
		"pod", p.Namespace + "/" + p.Name,
		"direction", d.String(),
		"policies", p.policies[d],
		"reason", why.String(),
	}
	if detail := l.detail(e, s, f, p, d, why); detail != "" {
		attrs = append(attrs, "detail", detail)
	}
	attrs = append(attrs, "suppressed", suppressed)
	l.log.Debug("network policy denied a packet", attrs...)
}

// detail says more about why: which rule's peers or ports did not match.
func (l *denyLog) detail(e *Enforcer, s *Snapshot, f *Flow, p *Pod, d Direction, why DenyReason) string {
	switch why {
	case DenyNoRule:
		tb := p.tables[d]
		if tb == nil {
			return ""
		}
		// decide judged either this packet's tuple or, for a TCP
		// segment without SYN, also the reverse; the packet's own
		// tuple is the one denied.
		peer := f.Src
		if d == Egress {
			peer = f.Dst
		}
		return tb.explain(peer, f.Proto, f.DstPort, f.Ports)
	case DenyEarlier:
		return fmt.Sprintf("a snapshot after the one that allowed its connection (now generation %d) denies it", s.gen)
	case DenyUntrackedError:
		in := f.Inner.Proto
		return "it quotes " + flowString(&f.Inner, in == ProtoTCP || in == ProtoUDP || in == ProtoSCTP) + ", of no connection tracked and allowed"
	case DenyTrackerFull:
		return fmt.Sprintf("the pod tracks %d connections (its share is %d; the node's %d of %d)",
			p.owner.Owned(), e.ct.cfg.PodShare, e.ct.Len(), e.ct.cfg.MaxConns)
	}
	return ""
}

// flowString is a tuple for the log: "TCP 10.0.0.1:40000 -> 10.0.0.2:80".
func flowString(t *Tuple, ports bool) string {
	if !ports {
		return fmt.Sprintf("%s %s -> %s", protoName(t.Proto), t.Src, t.Dst)
	}
	return fmt.Sprintf("%s %s -> %s", protoName(t.Proto),
		netip.AddrPortFrom(t.Src, t.SrcPort), netip.AddrPortFrom(t.Dst, t.DstPort))
}
