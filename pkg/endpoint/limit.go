package endpoint

import (
	"fmt"
	"math"
	"time"

	"golang.org/x/time/rate"
)

// RxLimit bounds how much a link's peer can make the endpoint receive, and
// so how much of the receiving process's CPU one peer can take. Frames
// beyond the budget are not read until it allows: the peer's queue fills and
// the peer meets back-pressure on its own side (a sandbox's writer waits or
// drops, the kernel drops at a full TAP queue). The receiver spends nothing
// on them. The zero value limits nothing.
type RxLimit struct {
	// PacketsPerSecond is the sustained frame rate: 0 (unlimited) or at
	// least MinRxPacketsPerSecond.
	PacketsPerSecond float64
	// BytesPerSecond is the sustained byte rate (frames with their link
	// headers): 0 (unlimited) or at least MinRxBytesPerSecond.
	BytesPerSecond float64
	// Burst is how long the peer may send at any speed after it has been
	// quiet, expressed as that long at the sustained rates. Zero means
	// DefaultRxBurst. A burst never goes below one batch of the largest
	// frames.
	Burst time.Duration
}

// DefaultRxBurst is RxLimit's default burst.
const DefaultRxBurst = 20 * time.Millisecond

// The smallest limits: below them one large frame would hold a reader (and
// a stop waiting for it) for more than about 65 ms.
const (
	MinRxPacketsPerSecond = 1000
	MinRxBytesPerSecond   = 1 << 20
)

// IsZero reports whether l limits nothing.
func (l RxLimit) IsZero() bool { return l.PacketsPerSecond == 0 && l.BytesPerSecond == 0 }

// Validate reports a negative, infinite or NaN rate or burst.
func (l RxLimit) Validate() error {
	for _, f := range []struct {
		name string
		v    float64
		min  float64
	}{
		{"packets per second", l.PacketsPerSecond, MinRxPacketsPerSecond},
		{"bytes per second", l.BytesPerSecond, MinRxBytesPerSecond},
	} {
		if f.v != 0 && !(f.v >= f.min && !math.IsInf(f.v, 0)) {
			return fmt.Errorf("receive limit: %s is %v, want 0 (unlimited) or a finite number >= %v", f.name, f.v, f.min)
		}
	}
	if l.Burst < 0 {
		return fmt.Errorf("receive limit: burst %v is negative", l.Burst)
	}
	return nil
}

// RxLimiter enforces an RxLimit for one receive loop. A nil *RxLimiter
// limits nothing.
type RxLimiter struct {
	pkts, bytes *rate.Limiter // nil: that rate is unlimited
	stats       *Stats
}

// NewRxLimiter returns the limiter of l for a reader that takes at most
// batch frames of at most maxFrame bytes at once, or nil when l is zero.
func NewRxLimiter(l RxLimit, batch int, maxFrame uint32, stats *Stats) *RxLimiter {
	if l.IsZero() {
		return nil
	}
	burst := l.Burst
	if burst == 0 {
		burst = DefaultRxBurst
	}
	r := &RxLimiter{stats: stats}
	if l.PacketsPerSecond > 0 {
		b := max(int(l.PacketsPerSecond*burst.Seconds()), batch)
		r.pkts = rate.NewLimiter(rate.Limit(l.PacketsPerSecond), b)
	}
	if l.BytesPerSecond > 0 {
		b := max(int(l.BytesPerSecond*burst.Seconds()), batch*int(maxFrame))
		r.bytes = rate.NewLimiter(rate.Limit(l.BytesPerSecond), b)
	}
	return r
}

// take charges n frames of size bytes (more than a burst counts as one
// burst) and, when the budget is spent, sleeps until it covers
// them again or done is closed. It reports false when done was closed.
func (r *RxLimiter) Take(n, size int, done <-chan struct{}) bool {
	if r == nil || n == 0 {
		return true
	}
	now := time.Now()
	var delay time.Duration
	if r.pkts != nil {
		delay = max(delay, r.pkts.ReserveN(now, min(n, r.pkts.Burst())).DelayFrom(now))
	}
	if r.bytes != nil {
		delay = max(delay, r.bytes.ReserveN(now, min(size, r.bytes.Burst())).DelayFrom(now))
	}
	if delay <= 0 {
		return true
	}
	r.stats.RxThrottled.Add(1)
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-done:
		return false
	}
}
