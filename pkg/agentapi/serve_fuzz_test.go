package agentapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzDecodeResponse feeds arbitrary records to the client's parser of the
// agent's answers, for every op. It must never panic; a failure is an
// *Error with CodeDecodingFailure or CodeVersionMismatch; an accepted
// response has this version and, unless it carries the agent's error, the
// body its op needs.
func FuzzDecodeResponse(f *testing.F) {
	ops := []string{OpAttach, OpDetach, OpCheck, OpStatus, OpGC}
	seeds := []string{
		`{"version":1,"status":{"ready":true,"attachments":2}}`,
		`{"version":1}`,
		`{"version":1,"newer":{"x":1}}`,
		`{"version":1,"error":{"code":103,"msg":"no address"}}`,
		`{"version":1,"error":null}`,
		`{"version":1,"gc":{"released":[{"containerID":"c","ifName":"eth0"}]}}`,
		`{"version":3,"status":{}}`,
		`<html>`,
		`{"version":1,"status":{}}{}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32","gateway":"169.254.1.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}],"mtu":1500,"mac":"0a:58:0a:f4:00:02","gatewayMAC":"ee:ee:ee:ee:ee:ee","socketPath":"/run/x.sock"}}`,
	}
	for i, s := range seeds {
		f.Add([]byte(s), uint8(i))
	}
	f.Fuzz(func(t *testing.T, data []byte, opSel uint8) {
		op := ops[int(opSel)%len(ops)]
		resp, err := DecodeResponse(data, op)
		if err != nil {
			e, ok := err.(*Error)
			if !ok {
				t.Fatalf("error %T %v is not *Error", err, err)
			}
			if e.Code != CodeDecodingFailure && e.Code != CodeVersionMismatch {
				t.Fatalf("code %d: %v", e.Code, e)
			}
			if resp != nil {
				t.Fatal("response returned with an error")
			}
			return
		}
		if resp.Version != Version {
			t.Fatalf("accepted version %d", resp.Version)
		}
		if resp.Error == nil && checkBody(op, resp) != nil {
			t.Fatalf("accepted a %s response without its body: %q", op, data)
		}
	})
}

// fdKinds are the descriptors FuzzServeConn can attach to a record, chosen
// by one fuzz byte each.
var fdKinds = []string{"pipe-r", "pipe-w", "memfd-sealed", "memfd", "eventfd", "devnull", "socket"}

// newFDOf creates one descriptor of fdKinds[k%len]. It returns every
// descriptor it created (a pipe's other end, a socketpair's peer) for the
// caller to close, the one to send first.
func newFDOf(k byte) ([]int, error) {
	switch fdKinds[int(k)%len(fdKinds)] {
	case "pipe-r", "pipe-w":
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			return nil, err
		}
		if k%2 == 1 {
			return []int{p[1], p[0]}, nil
		}
		return []int{p[0], p[1]}, nil
	case "memfd-sealed", "memfd":
		fd, err := unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			return nil, err
		}
		if err := unix.Ftruncate(fd, 4096); err != nil {
			unix.Close(fd)
			return nil, err
		}
		if fdKinds[int(k)%len(fdKinds)] == "memfd-sealed" {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
				unix.Close(fd)
				return nil, err
			}
		}
		return []int{fd}, nil
	case "eventfd":
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			return nil, err
		}
		return []int{fd}, nil
	case "devnull":
		fd, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		return []int{fd}, nil
	default:
		p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		return p[:], nil
	}
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// fuzzHandler checks what reaches a handler: a request that validates with
// exactly the descriptors its op and kind need. It closes them, as the
// agent's handler does.
type fuzzHandler struct{ t *testing.T }

func (h fuzzHandler) ServeAgent(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
	defer closeFiles(files)
	if err := req.Validate(); err != nil {
		h.t.Errorf("handler got an invalid request: %v", err)
	}
	if err := req.ValidateFDs(len(files)); err != nil {
		h.t.Errorf("handler got %d descriptors: %v", len(files), err)
	}
	switch req.Op {
	case OpAttach:
		return &Response{Attach: &AttachResponse{MTU: 1500}}, nil
	case OpStatus:
		return &Response{Status: &StatusResponse{Ready: true}}, nil
	case OpGC:
		return &Response{GC: &GCResponse{}}, nil
	}
	return nil, nil
}

// FuzzServeConn drives the real server's connection code (serveConn: the
// one the agent runs for each connection on its socket) over a real
// SOCK_SEQPACKET socketpair with an arbitrary record, padded by pad bytes
// (up to past MaxMessageSize), carrying one descriptor per byte of fdSpec
// (kinds from fdKinds; more than MaxFDs included), or with nothing sent
// and the write side shut (hangup). It must never panic, must answer every
// record with one well-formed response (version, and either the body the
// op needs or an error whose code is the server's), must call the handler
// only with valid requests and the right descriptor count, and must leave
// no descriptor open: the process has as many as before. The handler is a
// checker standing in for the agent's, which needs a router in a network
// namespace; test/e2e sends the same kinds of records to the real agent.
func FuzzServeConn(f *testing.F) {
	for _, tc := range decodeCases() {
		if len(tc.in) <= MaxMessageSize {
			f.Add([]byte(tc.in), []byte{}, uint32(0), false, false)
		}
	}
	shm := mustJSON(f, validRequests()["attach shm"])
	tap := mustJSON(f, validRequests()["attach tap"])
	status := []byte(`{"version":1,"op":"status"}`)
	f.Add(shm, []byte{2, 4, 2, 2, 2, 2, 4, 2, 2, 2}, uint32(0), false, false)
	f.Add(shm, []byte{0, 1, 2}, uint32(0), false, false)
	f.Add(tap, []byte{4}, uint32(0), false, false)
	f.Add(tap, []byte{6, 6}, uint32(0), false, false)
	f.Add(status, bytes.Repeat([]byte{0}, MaxFDs+1), uint32(0), false, false)
	f.Add(status, bytes.Repeat([]byte{5}, MaxFDs+4), uint32(0), false, false)
	f.Add(status, []byte{}, uint32(MaxMessageSize-len(status)), false, false)
	f.Add(status, []byte{1, 2}, uint32(MaxMessageSize-len(status)+1), false, false)
	f.Add(status, []byte{}, uint32(0), true, false)
	f.Add(status, []byte{}, uint32(0), false, true)
	f.Add([]byte{}, []byte{3}, uint32(0), false, false)

	ln := closedListener(f)
	f.Fuzz(func(t *testing.T, payload, fdSpec []byte, pad uint32, hangup, denyRoot bool) {
		// Keep the record sendable: a SOCK_SEQPACKET record must fit the
		// socket buffer, and the kernel takes at most 253 descriptors.
		pad %= 2 * MaxMessageSize
		if len(payload) > 2*MaxMessageSize {
			payload = payload[:2*MaxMessageSize]
		}
		if len(fdSpec) > 2*MaxFDs {
			fdSpec = fdSpec[:2*MaxFDs]
		}
		before := openFDs(t)
		// Scoped so that every descriptor of the iteration is closed
		// before the count after.
		func() {
			opts := []Option{}
			if denyRoot {
				opts = append(opts, WithPeerUIDs(65534))
			}
			s, err := NewServer(ln, fuzzHandler{t}, nil, opts...)
			if err != nil {
				t.Fatal(err)
			}
			client, server := seqpacketPair(t)
			defer client.Close()

			done := make(chan struct{})
			go func() {
				defer close(done)
				s.serveConn(context.Background(), server) // closes server
			}()

			var rec []byte
			if hangup {
				if err := client.CloseWrite(); err != nil {
					t.Fatal(err)
				}
			} else {
				var sendFDs, all []int
				defer func() { unixClose(all) }()
				for _, k := range fdSpec {
					fds, err := newFDOf(k)
					if err != nil {
						t.Fatal(err)
					}
					sendFDs = append(sendFDs, fds[0])
					all = append(all, fds...)
				}
				rec = append(bytes.Clone(payload), bytes.Repeat([]byte{' '}, int(pad))...)
				var oob []byte
				if len(sendFDs) > 0 {
					oob = unix.UnixRights(sendFDs...)
				}
				if _, _, err := client.WriteMsgUnix(rec, oob, nil); err != nil {
					t.Fatalf("send %d bytes, %d fds: %v", len(rec), len(sendFDs), err)
				}
				// Our copies go now: whatever stays open is the
				// server's.
				unixClose(all)
				all = nil
			}
			buf := make([]byte, MaxMessageSize+1)
			n, err := client.Read(buf)
			<-done
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			checkAnswer(t, buf[:n], rec, len(fdSpec), hangup, denyRoot)
		}()
		if after := openFDs(t); after != before {
			t.Fatalf("%d descriptors open after the connection, %d before", after, before)
		}
	})
}

// checkAnswer checks the server's answer to one fuzzed record.
func checkAnswer(t *testing.T, answer, rec []byte, nfds int, hangup, denied bool) {
	t.Helper()
	var resp Response
	dec := json.NewDecoder(bytes.NewReader(answer))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&resp); err != nil {
		t.Fatalf("answer %q is not a response: %v", answer, err)
	}
	if resp.Version != Version {
		t.Fatalf("answer version %d", resp.Version)
	}
	if resp.Error == nil {
		switch {
		case denied:
			t.Fatalf("request from a denied uid served: %s", answer)
		case hangup:
			t.Fatalf("empty record served: %s", answer)
		case len(rec) > MaxMessageSize || nfds > MaxFDs:
			t.Fatalf("%d bytes with %d fds served: %s", len(rec), nfds, answer)
		}
		req, err := DecodeRequest(rec)
		if err != nil {
			t.Fatalf("request the decoder refuses (%v) served: %s", err, answer)
		}
		if err := req.ValidateFDs(nfds); err != nil {
			t.Fatalf("request with the wrong descriptor count served (%v): %s", err, answer)
		}
		if checkBody(req.Op, &resp) != nil {
			t.Fatalf("success without the body of %s: %s", req.Op, answer)
		}
		return
	}
	e := resp.Error
	switch e.Code {
	case CodeDecodingFailure, CodeVersionMismatch, CodeUnsupportedField, CodeInvalidConfig:
	case CodePermissionDenied:
		if !denied {
			t.Fatalf("root refused: %v", e)
		}
	default:
		t.Fatalf("code %d: %v", e.Code, e)
	}
	if denied && e.Code != CodePermissionDenied {
		t.Fatalf("denied uid got code %d, want %d", e.Code, CodePermissionDenied)
	}
	if e.Msg == "" {
		t.Fatalf("error without a message: %s", answer)
	}
	if nfds > MaxFDs && !denied && len(rec) <= MaxMessageSize && !hangup {
		if e.Code != CodeInvalidConfig || !strings.Contains(e.Details, fmt.Sprintf("at most %d", MaxFDs)) {
			t.Fatalf("%d fds: got %v, want code %d naming the limit", nfds, e, CodeInvalidConfig)
		}
	}
}

// seqpacketPair returns both ends of a fresh SOCK_SEQPACKET socketpair.
func seqpacketPair(t *testing.T) (client, server *net.UnixConn) {
	t.Helper()
	p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "seqpacket")
		defer f.Close() // FileConn dups it
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conv(p[0]), conv(p[1])
}

// closedListener is a listener NewServer insists on, already closed: the
// fuzz target calls serveConn itself and never runs Serve.
func closedListener(tb testing.TB) *net.UnixListener {
	tb.Helper()
	dir, err := os.MkdirTemp("", "agentapi-fuzz")
	if err != nil {
		tb.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: dir + "/agent.sock", Net: "unixpacket"})
	if err != nil {
		tb.Fatal(err)
	}
	ln.Close()
	return ln
}

func unixClose(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
