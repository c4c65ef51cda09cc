package agentapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCallAgentNotRunning checks a missing socket and a socket nobody
// accepts on both give CodeTryAgainLater, keeping the cause.
func TestCallAgentNotRunning(t *testing.T) {
	dir := shortTempDir(t)
	refused := filepath.Join(dir, "dead.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: refused, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	tests := []struct {
		name, path string
		cause      error
	}{
		{"missing socket", filepath.Join(dir, "none.sock"), syscall.ENOENT},
		{"refused", refused, syscall.ECONNREFUSED},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Call(context.Background(), tc.path, &Request{Op: OpStatus}, nil)
			if codeOf(err) != CodeTryAgainLater || !errors.Is(err, tc.cause) {
				t.Errorf("got %v (code %d), want code 11 caused by %v", err, codeOf(err), tc.cause)
			}
			if got := ToCNI(err).Code; got != 11 {
				t.Errorf("CNI code %d, want 11", got)
			}
		})
	}
}

// TestCallRejectsBeforeSending checks requests Call must refuse without
// connecting: the socket path does not exist, so any dial would give code
// 11 instead.
func TestCallRejectsBeforeSending(t *testing.T) {
	nowhere := filepath.Join(shortTempDir(t), "none.sock")
	var ips []string
	for i := range 5000 {
		ips = append(ips, fmt.Sprintf("10.%d.%d.1/32", i/256, i%256))
	}
	huge := tapAttach()
	huge.IPs = ips
	tests := []struct {
		name string
		req  *Request
		nfds int
		code uint
		sub  string
	}{
		{"too large", &Request{Op: OpAttach, Attach: huge}, 1, CodeInvalidConfig, "more than the protocol's limit of 65536"},
		{"invalid", &Request{Op: "xyz"}, 0, CodeInvalidConfig, `op: "xyz"`},
		{"wrong fd count", &Request{Op: OpAttach, Attach: shmAttach()}, 1, CodeInvalidConfig, "needs 10 file descriptors, got 1"},
		{"nil", nil, 0, CodeInvalidConfig, "nil request"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fds := newPipes(t, tc.nfds).r
			_, err := Call(context.Background(), nowhere, tc.req, fds)
			if codeOf(err) != tc.code || !strings.Contains(err.Error(), tc.sub) {
				t.Errorf("got %v (code %d), want code %d with %q", err, codeOf(err), tc.code, tc.sub)
			}
		})
	}
}

// TestCallContext checks that ending the caller's context ends a call the
// agent does not answer, with code 11 and the context's error in the chain.
func TestCallContext(t *testing.T) {
	tests := []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
		want error
	}{
		{"deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 100*time.Millisecond)
		}, context.DeadlineExceeded},
		{"cancel", func() (context.Context, context.CancelFunc) {
			return context.WithCancel(context.Background())
		}, context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := newBlocker()
			path, _ := startServer(t, b)
			t.Cleanup(b.unblock) // runs before the server's cleanup
			ctx, cancel := tc.ctx()
			defer cancel()
			done := make(chan error, 1)
			go func() {
				_, err := Call(ctx, path, &Request{Op: OpStatus}, nil)
				done <- err
			}()
			<-b.entered
			if tc.want == context.Canceled {
				cancel()
			}
			err := <-done
			if codeOf(err) != CodeTryAgainLater || !errors.Is(err, tc.want) {
				t.Errorf("got %v (code %d), want code 11 caused by %v", err, codeOf(err), tc.want)
			}
		})
	}
}

// TestCallContextDoneBeforeDial checks an already-cancelled context fails
// the call with code 11 without reaching the agent.
func TestCallContextDoneBeforeDial(t *testing.T) {
	rec := &recorder{}
	path, _ := startServer(t, rec)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Call(ctx, path, &Request{Op: OpStatus}, nil)
	if codeOf(err) != CodeTryAgainLater || !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want code 11 caused by context.Canceled", err)
	}
	if rec.calls() != 0 {
		t.Error("the agent handled a call whose context was done")
	}
}
