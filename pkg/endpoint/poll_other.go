//go:build !linux

package endpoint

// osYield does nothing where sched_yield is not at hand: the runtime's
// yield (runtime.Gosched) stays.
func osYield() {}

// Yield does nothing here (see osYield).
func Yield() {}
