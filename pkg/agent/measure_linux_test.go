package agent

import (
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestMeasureConcurrentAttaches measures the agent alone (no CNI binary, no
// pod netns work): rounds of 100 shm attaches at once, then their detaches,
// with the state directory on the test's disk; it logs the median rate.
// A measurement, not a check: it runs only with SHM_CNI_MEASURE=1.
func TestMeasureConcurrentAttaches(t *testing.T) {
	if os.Getenv("SHM_CNI_MEASURE") != "1" {
		t.Skip("a measurement: run with SHM_CNI_MEASURE=1")
	}
	e := newEnv(t)
	r := e.start(t)
	const n, rounds = 100, 5
	var rates []float64
	for round := range rounds {
		var wg sync.WaitGroup
		errs := make(chan error, n)
		start := time.Now()
		for i := range n {
			wg.Go(func() {
				if _, err := r.tryAttachShm(t, fmt.Sprintf("r%dc%d", round, i)); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		rates = append(rates, n/elapsed.Seconds())
		for i := range n {
			r.detach(t, fmt.Sprintf("r%dc%d", round, i), "eth0")
		}
	}
	sorted := slices.Sorted(slices.Values(rates))
	t.Logf("%d concurrent shm attaches: %.0f attaches/s (median of %d rounds: %.0f)", n, sorted[rounds/2], rounds, rates)
}
