package agentapi

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// shortTempDir returns a fresh directory with a path short enough for a
// unix socket name (108 bytes), removed at cleanup.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "agentapi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startServer serves h on a fresh socket until the test ends; cleanup
// closes the server and checks Serve's result.
func startServer(t *testing.T, h Handler, opts ...Option) (string, *Server) {
	t.Helper()
	path := filepath.Join(shortTempDir(t), "agent.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := NewServer(ln, h, log, opts...)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(context.Background()) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-errc; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return path, srv
}

// rawCall sends payload and fds as one record, bypassing Call's checks, and
// decodes the answer leniently.
func rawCall(t *testing.T, path string, payload []byte, fds []int) *Response {
	t.Helper()
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := conn.WriteMsgUnix(payload, oob, nil); err != nil {
		t.Fatalf("send: %v", err)
	}
	buf := make([]byte, MaxMessageSize)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	var resp Response
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		t.Fatalf("decode %q: %v", buf[:n], err)
	}
	return &resp
}

// pipes are test pipes whose descriptors a test can send and count.
type pipes struct {
	r, w   []int
	inodes map[string]bool // "pipe:[N]" of every pipe
}

// newPipes creates n pipes, closed at cleanup unless closed before.
func newPipes(t *testing.T, n int) *pipes {
	t.Helper()
	p := &pipes{inodes: map[string]bool{}}
	for range n {
		var fds [2]int
		if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		p.r = append(p.r, fds[0])
		p.w = append(p.w, fds[1])
		link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fds[0]))
		if err != nil {
			t.Fatal(err)
		}
		p.inodes[link] = true
	}
	t.Cleanup(p.close)
	return p
}

func (p *pipes) close() {
	for _, fd := range append(p.r, p.w...) {
		unix.Close(fd)
	}
	p.r, p.w = nil, nil
}

// open counts the descriptors of this process that refer to p's pipes.
func (p *pipes) open(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err == nil && p.inodes[link] {
			n++
		}
	}
	return n
}

// packageGoroutines returns the stacks of goroutines that run non-test code
// of this package. A goroutine that has just signalled its WaitGroup may
// still be exiting, so it looks again (up to a few seconds) before it
// reports one: a correct server never waits that long.
func packageGoroutines() []string {
	var out []string
	for try := range 500 {
		if try > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		out = out[:0]
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			for line := range strings.SplitSeq(g, "\n") {
				_, fn, ok := strings.Cut(line, "shm-cni/pkg/agentapi.")
				if ok && !strings.HasPrefix(fn, "Test") && !strings.HasPrefix(fn, "packageGoroutines") {
					out = append(out, g)
					break
				}
			}
		}
		if len(out) == 0 {
			return nil
		}
	}
	return out
}

// mustJSON marshals v.
func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// codeOf returns the code of err's *Error, or 0.
func codeOf(err error) uint {
	if e, ok := err.(*Error); ok {
		return e.Code
	}
	return 0
}
