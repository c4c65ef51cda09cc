package endpoint

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// arrivals feeds p n frames, each gap after the source went empty.
func arrivals(p *Poll, n int, gap time.Duration) {
	for range n {
		p.idleSince = monotonic()
		time.Sleep(gap)
		p.Arrived()
	}
}

func TestPollNeverPollsASparseLink(t *testing.T) {
	p := NewPoll(200 * time.Microsecond)
	if b := p.Budget(); b != 0 {
		t.Fatalf("a new Poll polls for %v, want 0 (no gaps measured yet)", b)
	}
	calls := 0
	if p.Wait(func() bool { calls++; return false }, nil) {
		t.Fatal("Wait found a frame")
	}
	if calls != 0 {
		t.Errorf("Wait checked the source %d times on a sparse link, want 0", calls)
	}
	// Gaps of 5 ms, far beyond the 200 µs bound, keep it from polling.
	arrivals(&p, 3, 5*time.Millisecond)
	if b := p.Budget(); b != 0 {
		t.Errorf("after 5 ms gaps the budget is %v, want 0", b)
	}
}

func TestPollFollowsShortGaps(t *testing.T) {
	const max = 50 * time.Millisecond
	p := NewPoll(max)
	// Gaps of about 1 ms, a tenth of the bound: the smoothed gap falls
	// from the bound towards them and the budget opens.
	arrivals(&p, 20, time.Millisecond)
	b := p.Budget()
	if b == 0 || b >= max {
		t.Fatalf("after 1 ms gaps the budget is %v, want between 0 and %v", b, max)
	}
	// A frame that turns up within the budget is found by polling.
	var ready atomic.Bool
	go func() {
		time.Sleep(b / 4)
		ready.Store(true)
	}()
	if !p.Wait(ready.Load, nil) {
		t.Fatalf("Wait with a budget of %v missed a frame that came after %v", b, b/4)
	}
	p.Arrived()
	// One that does not turn up ends the poll within about the budget.
	start := time.Now()
	if p.Wait(func() bool { return false }, nil) {
		t.Fatal("Wait found a frame in an empty source")
	}
	if took := time.Since(start); took < p.Budget()/2 {
		t.Errorf("Wait gave up after %v, budget %v", took, p.Budget())
	}
	// Long gaps again close it.
	arrivals(&p, 6, 2*max)
	if b := p.Budget(); b != 0 {
		t.Errorf("after gaps of twice the bound the budget is %v, want 0", b)
	}
}

func TestPollStop(t *testing.T) {
	p := NewPoll(time.Hour)
	p.gap = int64(time.Minute) // a budget of two minutes
	var stopped atomic.Bool
	time.AfterFunc(10*time.Millisecond, func() { stopped.Store(true) })
	done := make(chan bool)
	go func() { done <- p.Wait(func() bool { return false }, stopped.Load) }()
	select {
	case found := <-done:
		if found {
			t.Fatal("Wait reported a frame")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("stop did not end the poll")
	}
}

func TestPollDisabled(t *testing.T) {
	p := NewPoll(-1)
	p.gap = 1
	if b := p.Budget(); b != 0 {
		t.Errorf("NewPoll(-1) polls for %v", b)
	}
	var zero Poll
	if zero.Wait(func() bool { t.Fatal("the zero Poll checked the source"); return true }, nil) {
		t.Error("the zero Poll found a frame")
	}
	if d := NewPoll(0); d.max != int64(DefaultPollMax) {
		t.Errorf("NewPoll(0) polls up to %v, want DefaultPollMax", time.Duration(d.max))
	}
}

// TestPollersBounded: no more loops poll at once than the process has
// processors; the others sleep at once.
func TestPollersBounded(t *testing.T) {
	procs := runtime.GOMAXPROCS(0)
	loops := procs + 3
	var (
		release atomic.Bool
		polling atomic.Int32
		peak    atomic.Int32
		refused atomic.Int32
		wg      sync.WaitGroup
	)
	for range loops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := NewPoll(time.Hour)
			p.gap = int64(time.Minute)
			counted := false
			found := p.Wait(func() bool {
				if !counted {
					counted = true
					n := polling.Add(1)
					for {
						m := peak.Load()
						if n <= m || peak.CompareAndSwap(m, n) {
							break
						}
					}
				}
				return release.Load()
			}, nil)
			if counted {
				polling.Add(-1)
			}
			if !found {
				refused.Add(1)
			}
		}()
	}
	// Wait until every slot is taken and the rest were refused.
	deadline := time.Now().Add(30 * time.Second)
	for refused.Load() < int32(loops-procs) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	release.Store(true)
	wg.Wait()
	if got := refused.Load(); got != int32(loops-procs) {
		t.Errorf("%d of %d loops were refused a polling slot, want %d", got, loops, loops-procs)
	}
	if got := peak.Load(); got > int32(procs) {
		t.Errorf("%d loops polled at once, GOMAXPROCS is %d", got, procs)
	}
	if n := pollers.Load(); n != 0 {
		t.Errorf("%d polling slots still taken after every Wait returned", n)
	}
}

// TestPollProbesOutOfATrap: a link whose measured gaps are long only
// because it sleeps (each wake-up here takes twice the bound) but whose
// frames come soon after the source empties is not left sleeping: it
// probes, finds the frames, and polls again as usual. Without probes its
// budget stays 0 for good.
func TestPollProbesOutOfATrap(t *testing.T) {
	const max = 5 * time.Millisecond
	p := NewPoll(max)
	opened := -1
	for i := range probeMin + 20 {
		// The next frame comes 200 µs after the source went empty.
		var ready atomic.Bool
		time.AfterFunc(200*time.Microsecond, func() { ready.Store(true) })
		p.idleSince = 0
		if !p.Wait(ready.Load, nil) {
			// Slept: the wake-up comes late.
			time.Sleep(2 * max)
		}
		p.Arrived()
		if p.Budget() > 0 {
			opened = i
			break
		}
	}
	if opened < 0 {
		t.Fatalf("after %d frames 200 µs apart, each slept through to a wake-up of %v, the budget is still 0", probeMin+20, 2*max)
	}
	if opened < probeMin-1 {
		t.Errorf("the budget opened after %d frames, before the first probe (%d)", opened+1, probeMin)
	}
}

// TestPollProbesBackOff: a source that stays empty is probed ever more
// rarely: the sleeps between probes double from probeMin to probeMax.
func TestPollProbesBackOff(t *testing.T) {
	p := NewPoll(20 * time.Microsecond)
	probes := 0
	const waits = 2100
	for range waits {
		checked := false
		if p.Wait(func() bool { checked = true; return false }, nil) {
			t.Fatal("Wait found a frame in an empty source")
		}
		if checked {
			probes++
		}
	}
	// Probes after waits 8, 24, 56, 120, 248, 504, 1016, 2040: 8.
	if probes != 8 {
		t.Errorf("%d waits on an empty source probed it %d times, want 8 (doubling from %d)", waits, probes, probeMin)
	}
	if p.probeEvery != probeMax {
		t.Errorf("after them a probe comes every %d waits, want %d", p.probeEvery, probeMax)
	}
}

// TestPollRunsItsProcessorsGoroutines: a poll lets the goroutines of its
// processor run from its start (the TCP processing a delivery has just
// readied runs at once): on one processor, a goroutine readied before the
// poll and one readied by the first make the frame the poll waits for.
// The poll's budget, 2 ms, is shorter than the runtime's preemption of a
// goroutine that runs on (10 ms): a poll that did not yield would end
// without the frame.
func TestPollRunsItsProcessorsGoroutines(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	p := NewPoll(time.Second)
	p.gap = int64(time.Millisecond)
	if b := p.Budget(); b != 2*time.Millisecond {
		t.Fatalf("budget %v, want 2ms", b)
	}
	var first, second atomic.Bool
	go func() {
		first.Store(true)
		go second.Store(true)
	}()
	checks := 0
	found := p.Wait(func() bool {
		checks++
		return second.Load()
	}, nil)
	if !found {
		t.Fatalf("the poll ended after %d checks without the frame: it did not let its processor's goroutines run", checks)
	}
	if !first.Load() {
		t.Fatal("the poll found the frame before the goroutine that made it ran")
	}
	t.Logf("found at check %d", checks)
}
