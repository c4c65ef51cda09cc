package shm

import (
	"bufio"
	"bytes"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

type (
	tcpipNetworkProtocolNumber = tcpip.NetworkProtocolNumber
	stackPacketBuffer          = stack.PacketBuffer
)

// socketPair returns a connected unix socket pair, close-on-exec.
func socketPair(t testing.TB) (int, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fds[0], fds[1]
}

func closeFD(fd int) { unix.Close(fd) }

// resources are what a leak would leave behind in this process.
type resources struct {
	goroutines, threads, fds, maps int
}

func snapshotResources(t testing.TB) resources {
	t.Helper()
	runtime.GC()
	count := func(dir string) int {
		e, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		return len(e)
	}
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	maps := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		// Shared-memory mappings show as memfd files.
		if strings.Contains(sc.Text(), "memfd:") {
			maps++
		}
	}
	return resources{
		goroutines: runtime.NumGoroutine(),
		threads:    count("/proc/self/task"),
		fds:        count("/proc/self/fd"),
		maps:       maps,
	}
}

// waitResources gives exiting goroutines a moment to finish (they are
// already stopped; the scheduler may not have run them to the end) and
// returns the final counts.
func waitResources(t testing.TB, before resources) resources {
	t.Helper()
	var r resources
	for range 50 {
		r = snapshotResources(t)
		if r.goroutines <= before.goroutines && r.fds <= before.fds && r.maps <= before.maps {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return r
}

// waitFor polls cond until it holds; the bound is a hang guard, not a timing.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
