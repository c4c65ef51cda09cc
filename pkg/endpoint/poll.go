package endpoint

import (
	"runtime"
	"sync/atomic"
	"time"
)

// Adaptive polling of a link's receive side.
//
// A receive loop that finds its source empty (a TAP device's queue, a
// shared-memory ring) either sleeps until the peer wakes it or polls. A sleep
// costs a wake-up when the next frame comes: on an idle CPU that is the
// CPU's exit from its idle state, tens of microseconds on a virtual machine
// that halts its vCPUs, and a round trip through the agent crosses two
// such wake-ups per direction (the agent's and the receiver's). Polling
// costs the CPU it burns. A Poll spends that CPU only where it pays: it
// tracks the gaps between the link's recent arrivals (from the moment the
// source went empty to its next frame) and polls for twice the recent gap
// when that is shorter than the most it may poll, and not at all when frames
// come further apart (but for rare probes, below). An idle link therefore
// hardly polls (its gaps are long), a request/response exchange polls
// across its round trip, and a stream, whose source seldom empties, polls
// across the short gaps it has.
//
// The gaps a loop measures after it slept include its wake-up, so a link
// that stopped polling can stay stopped though its frames come close
// together: a request/response exchange whose round trip with wake-ups is
// longer than the bound never measures the short gaps polling would see (a
// fresh link starts out so, counted sparse, and a few hiccups in a row can
// put a polling one there). So a loop that does not poll still probes now
// and then: it polls once for the bound after every probeMin-th sleep; a
// probe that finds a frame measures a true gap and makes the next wait a
// probe too, until the smoothed gap lets the link poll as usual; one that
// finds nothing doubles the sleeps until the next, up to probeMax. An idle
// link probes only after frames, ever more rarely.
//
// Between checks a polling loop yields its CPU to the kernel's other threads
// (sched_yield): a pod's thread woken on the agent's CPU runs at once
// instead of waiting for the poll to end. It yields its processor to the
// runtime's other goroutines at the poll's start and every goschedEvery
// checks after (below). At most GOMAXPROCS receive loops
// of a process poll at once; one that finds no slot sleeps.

// DefaultPollMax is the longest a receive loop polls an empty source before
// it sleeps.
const DefaultPollMax = 200 * time.Microsecond

// Poll decides how long one receive loop polls. The zero value never
// polls; NewPoll makes one that does. A Poll belongs to its receive loop.
type Poll struct {
	max int64 // nanoseconds; 0: never poll
	// gap is the smoothed gap between an empty source and its next frame,
	// in nanoseconds (an exponentially weighted moving average, weight
	// 1/4), at most 2*max.
	gap int64
	// idleSince is when the source was found empty (0: it was not).
	idleSince int64
	// slept counts the waits that did not poll since the last probe;
	// probeEvery is how many there are between probes.
	slept, probeEvery int32
}

// probeMin and probeMax bound the number of waits without polling between
// two probes (see above).
const (
	probeMin = 8
	probeMax = 1024
)

// NewPoll returns a Poll that polls at most max at a time: max == 0 means
// DefaultPollMax, max < 0 never polling (the convention of the endpoints'
// Options.Poll).
func NewPoll(max time.Duration) Poll {
	switch {
	case max == 0:
		max = DefaultPollMax
	case max < 0:
		return Poll{}
	}
	// Until gaps are measured the link counts as sparse: no polling.
	return Poll{max: int64(max), gap: int64(max), probeEvery: probeMin}
}

// pollers counts the receive loops polling now, process-wide.
var pollers atomic.Int32

// monoBase anchors monotonic.
var monoBase = time.Now()

// monotonic is a monotonic clock in nanoseconds, never 0.
func monotonic() int64 { return int64(time.Since(monoBase)) + 1 }

// Arrived tells p that the source yielded a frame. Call it when a receive
// finds frames (it is cheap when the source was not empty before).
func (p *Poll) Arrived() {
	if p.idleSince == 0 {
		return
	}
	g := min(monotonic()-p.idleSince, 2*p.max)
	p.idleSince = 0
	p.gap += (g - p.gap) / 4
}

// Budget is how long the next Wait polls at most, from the recent gaps.
func (p *Poll) Budget() time.Duration {
	if p.max == 0 || p.gap >= p.max {
		return 0
	}
	return time.Duration(min(2*p.gap, p.max))
}

// Wait polls ready, which reports whether the source has a frame, for as
// long as p's budget allows, and reports whether it found one; false means
// the caller should arm its wake-up and sleep. stop, if not nil, is checked
// now and then and ends the poll early. Wait marks the source empty from
// its first call after an arrival.
func (p *Poll) Wait(ready func() bool, stop func() bool) bool {
	now := monotonic()
	if p.idleSince == 0 {
		p.idleSince = now
	}
	budget := p.Budget()
	probe := false
	if budget == 0 {
		if p.max == 0 {
			return false
		}
		if p.slept++; p.slept < p.probeEvery {
			return false
		}
		budget, probe = time.Duration(p.max), true
	}
	if pollers.Add(1) > int32(runtime.GOMAXPROCS(0)) {
		pollers.Add(-1)
		return false
	}
	defer pollers.Add(-1)
	if probe {
		p.slept = 0
	}
	deadline := now + int64(budget)
	for i := 0; ; i++ {
		if ready() {
			if probe {
				p.probeEvery = 1
			}
			return true
		}
		if i%8 == 7 && ((stop != nil && stop()) || monotonic() > deadline) {
			if probe {
				p.probeEvery = min(max(2*p.probeEvery, probeMin), probeMax)
			}
			return false
		}
		if i%goschedEvery == 0 {
			runtime.Gosched()
		}
		osYield()
	}
}

// goschedEvery is how many of a poll's checks run between two of the
// runtime's yields (runtime.Gosched), the first at the poll's start. That
// yield lets the processor's other goroutines run (the TCP processing a
// delivery has just readied, for one: the first), but it also wakes an idle
// processor's thread to look for work (wakep), which mostly finds none and
// parks again, or takes the polling goroutine to another thread: a futex
// wake and a park per call, on a virtual machine the other vCPU's wake-up.
// Between those yields a poll only gives the CPU to the kernel's other
// threads (sched_yield).
const goschedEvery = 16
