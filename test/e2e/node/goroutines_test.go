package node

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/pprof"
	rpprof "runtime/pprof"
	"strings"
	"testing"
)

// TestCountGoroutines counts the goroutines of this process's own profile,
// read as the tests read the agent's: over HTTP from net/http/pprof, whose
// handler runs on the goroutine serving the request. That goroutine is not
// counted: the count read over HTTP is the count read in the process just
// before and after, and a goroutine started counts.
func TestCountGoroutines(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	// A request asking the server to close the connection, as the
	// tests' readings do, from a client with no goroutine of its own.
	viaHTTP := func() int {
		t.Helper()
		c, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /debug/pprof/goroutine?debug=1 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %q (%v)", resp.Status, b, err)
		}
		n, err := CountGoroutines(string(b))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	direct := func() int {
		t.Helper()
		var b bytes.Buffer
		if err := rpprof.Lookup("goroutine").WriteTo(&b, 1); err != nil {
			t.Fatal(err)
		}
		n, err := CountGoroutines(b.String())
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// settled reads over HTTP between two readings in the process until
	// five in a row agree on one count, which it returns: the test
	// binary's own goroutines (a test before this one ending) may come
	// and go between readings.
	settled := func() int {
		t.Helper()
		for same, last, tries := 0, -1, 0; ; tries++ {
			if tries == 100 {
				t.Fatalf("no count held for five readings in 100")
			}
			before := direct()
			h := viaHTTP()
			if direct() != before {
				same = 0
				continue
			}
			if h != before {
				t.Fatalf("%d goroutines over HTTP, %d in the process before and after", h, before)
			}
			if h != last {
				same, last = 0, h
			}
			if same++; same == 5 {
				return h
			}
		}
	}
	base := settled()
	stop := make(chan struct{})
	defer close(stop)
	for range 3 {
		go func() { <-stop }()
	}
	if got := settled(); got != base+3 {
		t.Errorf("with 3 more goroutines: %d over HTTP, want %d", got, base+3)
	}
}

// TestCountGoroutinesBadProfile: what is not a goroutine profile in text
// is an error.
func TestCountGoroutinesBadProfile(t *testing.T) {
	for _, p := range []string{
		"",
		"<html>404</html>",
		"goroutine profile: total x\n1 @ 0x1\n#\t0x1\tmain.main+0x1\tmain.go:1\n",
		"goroutine profile: total 3\n1 @ 0x1\n#\t0x1\tmain.main+0x1\tmain.go:1\n",
		"goroutine profile: total 1\nmany @ 0x1\n",
	} {
		if n, err := CountGoroutines(p); err == nil {
			t.Errorf("%q: %d, want an error", strings.ReplaceAll(p, "\n", `\n`), n)
		}
	}
}
