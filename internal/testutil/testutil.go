// Package testutil holds what the project's tests share: skipping tests
// that need root, a logger that writes to the test's log, and fresh
// network namespaces removed when the test ends.
//
//	func TestPodLink(t *testing.T) {
//		testutil.RequireRoot(t)
//		pod := testutil.NewNS(t)
//		testutil.Do(t, pod, func() error { ... })
//	}
//
// Tests only: nothing outside _test.go files imports it.
package testutil

import (
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
)

// RequireRoot skips t unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (network namespaces, TUN/TAP devices, routes, nftables)")
	}
}

// Logger returns a logger that writes every record, debug and up, to t's
// log.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(LogWriter(t), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// LogWriter returns a writer that puts what each Write gets (a log
// record, a child's stderr) into t's log.
func LogWriter(t testing.TB) io.Writer { return testWriter{t} }

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
