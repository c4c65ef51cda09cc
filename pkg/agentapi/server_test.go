package agentapi

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// recorder is a handler that answers every op from the request and records
// what it got. It closes the files it receives.
type recorder struct {
	mu   sync.Mutex
	reqs []*Request // +checklocks:mu
	nfds []int      // +checklocks:mu
}

func (r *recorder) ServeAgent(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
	closeFiles(files)
	r.mu.Lock()
	r.reqs = append(r.reqs, req)
	r.nfds = append(r.nfds, len(files))
	r.mu.Unlock()
	return echo(req), nil
}

func (r *recorder) calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.reqs)
}

// echo derives a response from req, so a test can predict it.
func echo(req *Request) *Response {
	switch req.Op {
	case OpAttach:
		a := req.Attach
		resp := &AttachResponse{MTU: a.MTU, MAC: "0a:58:00:00:00:01", GatewayMAC: "0a:58:00:00:00:02"}
		for _, ip := range a.IPs {
			resp.IPs = append(resp.IPs, IPConfig{Address: ip, Gateway: "169.254.1.1"})
		}
		resp.Routes = []Route{{Dst: "0.0.0.0/0", GW: "169.254.1.1"}}
		if a.Kind == KindShm {
			resp.SocketPath = "/run/shm-cni/att/" + a.ContainerID + ".sock"
		}
		return &Response{Attach: resp}
	case OpStatus:
		return &Response{Status: &StatusResponse{Ready: true, Attachments: 7}}
	case OpGC:
		return &Response{GC: &GCResponse{Released: []Attachment{{ContainerID: "gone", IfName: "eth0"}}}}
	}
	return nil
}

// TestRoundTrip sends one request of every op and kind through a real
// socket and checks the handler gets it unchanged, with its FDs, and the
// client gets the handler's answer.
func TestRoundTrip(t *testing.T) {
	rec := &recorder{}
	path, _ := startServer(t, rec)
	for name, req := range validRequests() {
		t.Run(name, func(t *testing.T) {
			var fds []int
			if req.Attach != nil {
				fds = newPipes(t, req.Attach.WantFDs()).r
			}
			sent := *req
			sent.Version = 0 // Call sets it
			resp, err := Call(context.Background(), path, &sent, fds)
			if err != nil {
				t.Fatal(err)
			}
			want := echo(req)
			if want == nil {
				want = &Response{}
			}
			want.Version = Version
			if !reflect.DeepEqual(resp, want) {
				t.Errorf("response %s, want %s", mustJSON(t, resp), mustJSON(t, want))
			}
			rec.mu.Lock()
			got, nfds := rec.reqs[len(rec.reqs)-1], rec.nfds[len(rec.nfds)-1]
			rec.mu.Unlock()
			if !reflect.DeepEqual(got, req) {
				t.Errorf("handler got %s, want %s", mustJSON(t, got), mustJSON(t, req))
			}
			if nfds != len(fds) {
				t.Errorf("handler got %d fds, want %d", nfds, len(fds))
			}
		})
	}
}

// TestFDsPassInOrder sends the write ends of ten pipes with a shm attach;
// the handler writes its index into each, and the client reads every index
// back from the matching read end: the FDs work and keep their order. The
// received FDs are close-on-exec.
func TestFDsPassInOrder(t *testing.T) {
	path, _ := startServer(t, HandlerFunc(func(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
		defer closeFiles(files)
		for i, f := range files {
			flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
			if err != nil || flags&unix.FD_CLOEXEC == 0 {
				return nil, NewError(CodeInternal, "fd without FD_CLOEXEC", f.Name())
			}
			if _, err := f.Write([]byte{byte(i)}); err != nil {
				return nil, err
			}
		}
		return echo(req), nil
	}))
	p := newPipes(t, ShmFDs)
	if _, err := Call(context.Background(), path, validRequests()["attach shm"], p.w); err != nil {
		t.Fatal(err)
	}
	for i, r := range p.r {
		var b [2]byte
		n, err := unix.Read(r, b[:])
		if err != nil || n != 1 || b[0] != byte(i) {
			t.Errorf("pipe %d: read %d bytes %v, err %v; want [%d]", i, n, b[:n], err, i)
		}
	}
}

// TestTapFDReadable sends a pipe's read end with a tap attach; the handler
// reads what the client wrote before the call.
func TestTapFDReadable(t *testing.T) {
	got := make(chan string, 1)
	path, _ := startServer(t, HandlerFunc(func(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
		defer closeFiles(files)
		b := make([]byte, 16)
		n, err := files[0].Read(b)
		if err != nil {
			return nil, err
		}
		got <- string(b[:n])
		return echo(req), nil
	}))
	p := newPipes(t, 1)
	if _, err := unix.Write(p.w[0], []byte("frame")); err != nil {
		t.Fatal(err)
	}
	if _, err := Call(context.Background(), path, validRequests()["attach tap"], p.r); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "frame" {
		t.Errorf("handler read %q, want %q", s, "frame")
	}
}

// TestRejectedRequestsCloseFDs sends requests the server must refuse before
// the handler, each with pipe FDs; the client sees the right code, the
// handler is never called, and no descriptor of the pipes stays open in
// the server once the answer arrived.
func TestRejectedRequestsCloseFDs(t *testing.T) {
	rec := &recorder{}
	path, _ := startServer(t, rec)
	status := `{"version":1,"op":"status"}`
	tests := []struct {
		name    string
		payload string
		nfds    int
		code    uint
		sub     string
	}{
		{"shm with 3 fds", string(mustJSON(t, validRequests()["attach shm"])), 3, CodeInvalidConfig, `attach kind "shm" needs 10 file descriptors, got 3`},
		{"tap with 2 fds", string(mustJSON(t, validRequests()["attach tap"])), 2, CodeInvalidConfig, `attach kind "tap" needs 1 file descriptors, got 2`},
		{"detach with fd", string(mustJSON(t, validRequests()["detach"])), 1, CodeInvalidConfig, `op "detach" needs 0`},
		{"17 fds", status, MaxFDs + 1, CodeInvalidConfig, "at most 16"},
		{"garbage with fds", "\x00\x01garbage", 4, CodeDecodingFailure, "cannot decode request"},
		{"unknown field with fds", `{"version":1,"op":"status","bogus":1}`, 2, CodeUnsupportedField, `unknown field "bogus"`},
		{"wrong version with fds", `{"version":9,"op":"status"}`, 2, CodeVersionMismatch, "request has version 9, this side speaks version 1"},
		{"oversized with fds", status + strings.Repeat(" ", MaxMessageSize), 10, CodeDecodingFailure, "request is 65563 bytes, more than the limit of 65536"},
		{"invalid with fds", `{"version":1,"op":"attach","attach":{"kind":"xyz"}}`, 1, CodeInvalidConfig, `attach.kind: "xyz" is not one of shm, tap, veth`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPipes(t, (tc.nfds+1)/2)
			fds := append(p.r, p.w...)[:tc.nfds]
			before := p.open(t)
			resp := rawCall(t, path, []byte(tc.payload), fds)
			if after := p.open(t); after != before {
				t.Errorf("%d descriptors of the pipes open after the answer, %d before: the server leaked %d", after, before, after-before)
			}
			if resp.Error == nil || resp.Error.Code != tc.code || !strings.Contains(resp.Error.Error(), tc.sub) {
				t.Errorf("got %s, want code %d with %q", mustJSON(t, resp), tc.code, tc.sub)
			}
			if resp.Version != Version {
				t.Errorf("response version %d", resp.Version)
			}
		})
	}
	if n := rec.calls(); n != 0 {
		t.Errorf("handler called %d times", n)
	}
}

// TestMessageSizeLimit checks a request of exactly MaxMessageSize bytes is
// served and one byte more is refused.
func TestMessageSizeLimit(t *testing.T) {
	path, _ := startServer(t, &recorder{})
	status := `{"version":1,"op":"status"}`
	exact := status + strings.Repeat(" ", MaxMessageSize-len(status))
	if resp := rawCall(t, path, []byte(exact), nil); resp.Error != nil || resp.Status == nil {
		t.Errorf("%d bytes: got %s, want status", len(exact), mustJSON(t, resp))
	}
	resp := rawCall(t, path, []byte(exact+" "), nil)
	if resp.Error == nil || resp.Error.Code != CodeDecodingFailure || !strings.Contains(resp.Error.Details, "65537 bytes") {
		t.Errorf("%d bytes: got %s, want code 6", len(exact)+1, mustJSON(t, resp))
	}
}

// TestHandlerPanic checks a panicking handler yields CodeInternal, its files
// are closed, and the server keeps serving.
func TestHandlerPanic(t *testing.T) {
	path, _ := startServer(t, HandlerFunc(func(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
		if req.Op == OpAttach {
			panic("attach exploded")
		}
		return echo(req), nil
	}))
	p := newPipes(t, 1)
	before := p.open(t)
	_, err := Call(context.Background(), path, validRequests()["attach tap"], p.r)
	if codeOf(err) != CodeInternal || !strings.Contains(err.Error(), "attach exploded") {
		t.Errorf("got %v, want code 100 naming the panic", err)
	}
	if after := p.open(t); after != before {
		t.Errorf("server leaked %d descriptors of a panicking handler", after-before)
	}
	resp, err := Call(context.Background(), path, &Request{Op: OpStatus}, nil)
	if err != nil || !resp.Status.Ready {
		t.Errorf("after panic: %+v, %v", resp, err)
	}
}

// TestHandlerErrors checks how handler results become response errors.
func TestHandlerErrors(t *testing.T) {
	tests := []struct {
		name string
		resp *Response
		err  error
		code uint
		msg  string
	}{
		{"agent error", nil, NewError(CodeAddressExhausted, "no free address", "10.244.1.0/24"), CodeAddressExhausted, "no free address; 10.244.1.0/24"},
		{"wrapped agent error", nil, errors.Join(errors.New("ipam"), NewError(CodeAttachFailed, "tap gone", "")), CodeAttachFailed, "ipam\ntap gone"},
		{"plain error", nil, io.ErrUnexpectedEOF, CodeInternal, "unexpected EOF"},
		{"error in response", &Response{Error: NewError(CodeNotAvailable, "not ready", "")}, nil, CodeNotAvailable, "not ready"},
		{"attach without body", &Response{}, nil, CodeInternal, "response to attach has no attach body"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path, _ := startServer(t, HandlerFunc(func(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
				closeFiles(files)
				return tc.resp, tc.err
			}))
			p := newPipes(t, 1)
			resp, err := Call(context.Background(), path, validRequests()["attach tap"], p.r)
			if codeOf(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v (code %d), want code %d with %q", err, codeOf(err), tc.code, tc.msg)
			}
			if resp == nil || resp.Error == nil {
				t.Errorf("response %+v does not carry the error", resp)
			}
			if cni := ToCNI(err); cni.Code != tc.code {
				t.Errorf("ToCNI code %d, want %d", cni.Code, tc.code)
			}
		})
	}
}

// TestPeerUIDRejected allows only a uid the test does not run as: the
// request is refused with CodePermissionDenied, the handler never runs and
// the FDs are closed.
func TestPeerUIDRejected(t *testing.T) {
	uid := uint32(os.Getuid()) + 4242
	rec := &recorder{}
	path, _ := startServer(t, rec, WithPeerUIDs(uid))
	p := newPipes(t, 1)
	before := p.open(t)
	_, err := Call(context.Background(), path, validRequests()["attach tap"], p.r)
	if codeOf(err) != CodePermissionDenied {
		t.Errorf("got %v, want code %d", err, CodePermissionDenied)
	}
	if after := p.open(t); after != before {
		t.Errorf("server leaked %d descriptors", after-before)
	}
	if rec.calls() != 0 {
		t.Error("handler called for a refused peer")
	}
}

// TestHandlerContextDeadline checks the handler's context carries the
// connection deadline and is not cancelled otherwise.
func TestHandlerContextDeadline(t *testing.T) {
	const timeout = 5 * time.Second
	path, _ := startServer(t, HandlerFunc(func(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
		dl, ok := ctx.Deadline()
		if !ok || time.Until(dl) > timeout {
			return nil, NewError(CodeInternal, "bad deadline", dl.String())
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return echo(req), nil
	}), WithTimeout(timeout))
	if _, err := Call(context.Background(), path, &Request{Op: OpStatus}, nil); err != nil {
		t.Fatal(err)
	}
}

// TestIdleConnectionDropped checks a peer that connects and sends nothing
// is cut off at the deadline and does not block other requests.
func TestIdleConnectionDropped(t *testing.T) {
	path, _ := startServer(t, &recorder{}, WithTimeout(50*time.Millisecond))
	idle, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if _, err := Call(context.Background(), path, &Request{Op: OpStatus}, nil); err != nil {
		t.Fatalf("call beside an idle connection: %v", err)
	}
	n, err := idle.Read(make([]byte, 16))
	if n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("idle connection read %d, %v; want EOF from the server closing it", n, err)
	}
}

// blocker is a handler that blocks every request until released.
type blocker struct {
	entered  chan struct{} // receives once per request that entered
	release  chan struct{} // closed by unblock to let requests finish
	once     sync.Once
	finished atomic.Bool // set as the handler returns
}

// unblock lets every request finish; it may be called more than once.
func (b *blocker) unblock() { b.once.Do(func() { close(b.release) }) }

func newBlocker() *blocker {
	return &blocker{entered: make(chan struct{}, 8), release: make(chan struct{})}
}

func (b *blocker) ServeAgent(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
	closeFiles(files)
	b.entered <- struct{}{}
	<-b.release
	b.finished.Store(true)
	return echo(req), nil
}

// TestShutdownWaitsForHandler stops the server (by Close, or by cancelling
// Serve's context) while a handler runs: the server stops accepting, the
// stop returns only after the handler finished, the request in flight
// still gets its answer, and no goroutine of the package is left.
func TestShutdownWaitsForHandler(t *testing.T) {
	for _, how := range []string{"close", "cancel"} {
		t.Run(how, func(t *testing.T) {
			b := newBlocker()
			t.Cleanup(b.unblock) // a failing test must not hang the server
			path := shortTempDir(t) + "/agent.sock"
			ln, err := Listen(path)
			if err != nil {
				t.Fatal(err)
			}
			srv, err := NewServer(ln, b, nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			served := make(chan error, 1)
			go func() { served <- srv.Serve(ctx) }()

			type result struct {
				resp *Response
				err  error
			}
			called := make(chan result, 1)
			go func() {
				resp, err := Call(context.Background(), path, &Request{Op: OpStatus}, nil)
				called <- result{resp, err}
			}()
			<-b.entered

			stopped := make(chan bool, 1) // handler finished when the stop returned
			go func() {
				if how == "close" {
					srv.Close()
				} else {
					cancel()
					<-served
				}
				stopped <- b.finished.Load()
			}()
			// Wait until the listener is gone; then the stop is under way.
			// (A probe that still connects sends nothing: the server
			// answers it with a decode error, never reaching the handler.)
			for {
				c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
				if err != nil {
					break
				}
				c.Close()
			}
			// A stop that does not wait returns now; give it a moment to
			// show (a correct server passes whatever the delay).
			select {
			case <-stopped:
				t.Fatal("the stop returned while the handler was blocked")
			case <-time.After(100 * time.Millisecond):
			}
			b.unblock()
			if !<-stopped {
				t.Error("the stop returned before the handler finished")
			}
			if r := <-called; r.err != nil || r.resp.Status == nil {
				t.Errorf("in-flight call: %+v, %v", r.resp, r.err)
			}
			if how == "close" {
				if err := <-served; err != nil {
					t.Errorf("Serve: %v", err)
				}
			}
			if g := packageGoroutines(); len(g) > 0 {
				t.Errorf("goroutines left after the server stopped:\n%s", strings.Join(g, "\n\n"))
			}
		})
	}
}

// TestNoGoroutinesAfterClose serves many requests, concurrently, then
// closes the server: nothing of the package keeps running.
func TestNoGoroutinesAfterClose(t *testing.T) {
	path := shortTempDir(t) + "/agent.sock"
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(ln, &recorder{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background()) }()
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if _, err := Call(context.Background(), path, &Request{Op: OpStatus}, nil); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if g := packageGoroutines(); len(g) > 0 {
		t.Errorf("goroutines left after Close:\n%s", strings.Join(g, "\n\n"))
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after Close: %v", err)
	}
}

// TestServeTwiceAndCloseBeforeServe covers the lifecycle edges.
func TestServeTwiceAndCloseBeforeServe(t *testing.T) {
	path := shortTempDir(t) + "/agent.sock"
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(ln, &recorder{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(context.Background()); err != nil {
		t.Errorf("Serve after Close: %v, want nil", err)
	}
	if err := srv.Serve(context.Background()); err == nil {
		t.Error("second Serve succeeded")
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestNewServerChecksInputs checks the constructor refuses bad arguments.
func TestNewServerChecksInputs(t *testing.T) {
	path := shortTempDir(t) + "/agent.sock"
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tests := []struct {
		name string
		ln   *net.UnixListener
		h    Handler
		opts []Option
	}{
		{"nil listener", nil, &recorder{}, nil},
		{"nil handler", ln, nil, nil},
		{"zero timeout", ln, &recorder{}, []Option{WithTimeout(0)}},
		{"no uids", ln, &recorder{}, []Option{WithPeerUIDs()}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewServer(tc.ln, tc.h, nil, tc.opts...); err == nil {
				t.Error("NewServer succeeded")
			}
		})
	}
}
