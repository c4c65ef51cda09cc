package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// Hang guards: they bound how long a broken test waits; no test passes or
// fails on how fast something happened.
const (
	setupTimeout = 2 * time.Minute
	testTimeout  = 5 * time.Minute
)

// The binaries are built once per test binary run, by the first test that
// needs them, into binDir; TestMain removes binDir. There are two sets: the
// agent and sandbox plain, and race-built.
var (
	binDir   string
	binOnce  sync.Once
	binErr   error
	binSets  [2]node.Binaries // plain, race
	binBuilt [2]bool
	binMu    sync.Mutex
)

// raceAgent reports whether tests run the race-built agent and sandbox: by
// default when the test binary itself is race-built (go test -race), so a
// data race in the agent under real traffic fails the test that caused it.
// SHM_E2E_RACE=0 or 1 forces it. Race-built, they are about 15 times
// slower; TestBulkTransfers always runs the plain ones.
func raceAgent() bool {
	switch os.Getenv("SHM_E2E_RACE") {
	case "0":
		return false
	case "1":
		return true
	}
	return raceTest
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// binaries returns the plain or the race-built set, building it on first
// use.
func binaries(t *testing.T, race bool) node.Binaries {
	t.Helper()
	binOnce.Do(func() { binDir, binErr = os.MkdirTemp("", "e2e-bin") })
	if binErr != nil {
		t.Fatalf("build binaries: %v", binErr)
	}
	binMu.Lock()
	defer binMu.Unlock()
	i, name := 0, "plain"
	if race {
		i, name = 1, "race"
	}
	if !binBuilt[i] {
		dir := filepath.Join(binDir, name)
		if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		b, err := node.Build(ctx, dir, node.BuildOptions{Race: race})
		if err != nil {
			t.Fatalf("build binaries: %v", err)
		}
		binSets[i], binBuilt[i] = b, true
	}
	return binSets[i]
}

// newNode builds a node for t running the agent raceAgent says, closed when
// t ends. Then the agent must stop cleanly on SIGTERM (exit status 0), must
// not have died on its own before (a crash, a race report) and must have
// logged no data race; when t failed, the tail of its log is logged.
func newNode(t *testing.T, opts node.Options) *node.Node {
	t.Helper()
	return newNodeWith(t, opts, raceAgent())
}

// newNodeWith is newNode with the plain (race false) or race-built agent.
func newNodeWith(t *testing.T, opts node.Options, race bool) *node.Node {
	t.Helper()
	testutil.RequireRoot(t)
	opts.Binaries = binaries(t, race)
	if opts.Logger == nil {
		opts.Logger = testutil.Logger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	n, err := node.New(ctx, opts)
	if err != nil {
		t.Fatalf("new node: %v", err)
	}
	t.Cleanup(func() {
		if died, err := n.AgentExited(); died {
			t.Errorf("the agent exited on its own: %v", err)
		} else if n.Agent() != nil {
			if err := n.StopAgent(); err != nil {
				t.Errorf("the agent did not stop cleanly: %v", err)
			}
		}
		if logs, err := n.LogsContaining("DATA RACE"); err != nil {
			t.Error(err)
		} else {
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Errorf("data race reported in %s:\n%s", filepath.Base(l), b)
			}
		}
		if t.Failed() {
			t.Logf("agent log (tail):\n%s", n.AgentLogTail(40))
		}
		if err := n.Close(); err != nil {
			t.Errorf("close node: %v", err)
		}
	})
	return n
}

// testContext returns a context bounded by the hang guard, cancelled when t
// ends.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// addPod adds a pod or fails t.
func addPod(t *testing.T, ctx context.Context, n *node.Node, name, kind string) *node.Pod {
	t.Helper()
	p, err := n.AddPod(ctx, name, kind)
	if err != nil {
		t.Fatalf("add pod: %v", err)
	}
	return p
}

// fourPods adds two kernel pods (k1, k2) and two sandbox pods (s1, s2).
func fourPods(t *testing.T, ctx context.Context, n *node.Node) (k1, k2, s1, s2 *node.Pod) {
	t.Helper()
	return addPod(t, ctx, n, "k1", node.KindTap), addPod(t, ctx, n, "k2", node.KindTap),
		addPod(t, ctx, n, "s1", node.KindShm), addPod(t, ctx, n, "s2", node.KindShm)
}

func mib(n int64) string { return fmt.Sprintf("%d MiB", n>>20) }
