package agentapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"syscall"
	"time"
)

// DefaultTimeout bounds one connection: reading the request, the handler
// (through its context) and writing the response.
const DefaultTimeout = 30 * time.Second

// Handler serves the agent's requests.
type Handler interface {
	// ServeAgent handles one request that passed DecodeRequest and
	// ValidateFDs. files are the FDs that came with it, in order; the
	// handler owns them from the call on and must close those it does not
	// keep, whether it succeeds or fails (keep the *os.File reachable while
	// using its Fd, or the garbage collector closes it). If the handler
	// panics, the server closes them.
	//
	// ctx ends at the connection's deadline; it is not cancelled when the
	// server shuts down, so a request in flight completes.
	//
	// On success it returns the body matching req.Op (a nil *Response is an
	// empty success, valid for detach and check). An error becomes
	// Response.Error: an *Error in its chain keeps its code, anything else
	// gets CodeInternal.
	ServeAgent(ctx context.Context, req *Request, files []*os.File) (*Response, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request, files []*os.File) (*Response, error)

var _ Handler = HandlerFunc(nil)

// ServeAgent implements Handler.ServeAgent.
func (f HandlerFunc) ServeAgent(ctx context.Context, req *Request, files []*os.File) (*Response, error) {
	return f(ctx, req, files)
}

// Option configures a Server.
type Option func(*Server) error

// WithTimeout sets the per-connection deadline (default DefaultTimeout).
func WithTimeout(d time.Duration) Option {
	return func(s *Server) error {
		if d <= 0 {
			return fmt.Errorf("timeout %v: must be positive", d)
		}
		s.timeout = d
		return nil
	}
}

// WithPeerUIDs sets the uids allowed to connect, replacing the default of
// only root (0).
func WithPeerUIDs(uids ...uint32) Option {
	return func(s *Server) error {
		if len(uids) == 0 {
			return errors.New("peer uids: at least one required")
		}
		s.uids = make(map[uint32]bool, len(uids))
		for _, u := range uids {
			s.uids[u] = true
		}
		return nil
	}
}

// Server accepts connections on the agent socket and serves one request per
// connection. Create it with NewServer, run Serve, stop it with Close or by
// cancelling Serve's context.
type Server struct {
	// Immutable after NewServer.
	ln      *net.UnixListener
	h       Handler
	log     *slog.Logger
	timeout time.Duration
	uids    map[uint32]bool

	// done is closed (once, by shutdown) to stop accepting.
	done      chan struct{}
	closeOnce sync.Once
	// stopped is closed when Serve returns.
	stopped chan struct{}
	// conns counts connection goroutines in flight.
	conns sync.WaitGroup

	mu sync.Mutex
	// started is set when Serve begins.
	started bool // +checklocks:mu
}

// NewServer returns a server for ln that passes requests to h and logs to
// log (nil discards). The server owns ln: Serve and Close close it.
func NewServer(ln *net.UnixListener, h Handler, log *slog.Logger, opts ...Option) (*Server, error) {
	if ln == nil {
		return nil, errors.New("new agent server: nil listener")
	}
	if h == nil {
		return nil, errors.New("new agent server: nil handler")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		ln:      ln,
		h:       h,
		log:     log.With("socket", ln.Addr().String()),
		timeout: DefaultTimeout,
		uids:    map[uint32]bool{0: true},
		done:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, fmt.Errorf("new agent server: %w", err)
		}
	}
	return s, nil
}

// Serve creates a Server with NewServer and runs Serve(ctx) on it.
func Serve(ctx context.Context, ln *net.UnixListener, h Handler, log *slog.Logger, opts ...Option) error {
	s, err := NewServer(ln, h, log, opts...)
	if err != nil {
		return err
	}
	return s.Serve(ctx)
}

// Serve accepts connections until ctx is done or Close is called, then
// closes the listener and waits for every request in flight before it
// returns. It returns nil after such a stop, or the error that made
// accepting fail. Serve may be called once.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return errors.New("agent server: Serve called twice")
	}
	s.started = true
	s.mu.Unlock()
	defer close(s.stopped)

	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-ctx.Done():
			s.shutdown()
		case <-s.done:
		}
	}()

	err := s.acceptLoop(ctx)
	s.shutdown()
	<-watched
	s.conns.Wait()
	return err
}

func (s *Server) acceptLoop(ctx context.Context) error {
	var backoff time.Duration
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			select {
			case <-s.done:
				return nil
			default:
			}
			if !temporary(err) {
				return fmt.Errorf("accept on %s: %w", s.ln.Addr(), err)
			}
			// Out of descriptors or memory: wait and retry, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed, retrying", "err", err, "retryIn", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return nil
			}
			continue
		}
		backoff = 0
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			s.serveConn(ctx, conn)
		}()
	}
}

func temporary(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// shutdown stops accepting. It does not wait.
func (s *Server) shutdown() {
	s.closeOnce.Do(func() {
		close(s.done)
		if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			s.log.Warn("close listener", "err", err)
		}
	})
}

// Close stops accepting and, if Serve is running, waits until it returned:
// every request in flight has been answered and every goroutine of the
// server has ended. Close may be called more than once.
func (s *Server) Close() error {
	s.shutdown()
	s.mu.Lock()
	started := s.started
	s.mu.Unlock()
	if started {
		<-s.stopped
	}
	return nil
}

// serveConn serves the one request of conn and closes it.
func (s *Server) serveConn(ctx context.Context, conn *net.UnixConn) {
	defer conn.Close()
	start := time.Now()
	deadline := start.Add(s.timeout)
	log := s.log
	if err := conn.SetDeadline(deadline); err != nil {
		log.Warn("set connection deadline", "err", err)
		return
	}

	buf := make([]byte, MaxMessageSize)
	rec, err := recvMsg(conn, buf, MaxFDs)
	if err != nil {
		log.Warn("read request", "err", err)
		return
	}
	cred, err := peerCred(conn)
	if err != nil {
		closeFiles(rec.files)
		log.Warn("read peer credentials", "err", err)
		return
	}
	log = log.With("peerPID", cred.Pid, "peerUID", cred.Uid)

	req, rerr := s.checkRequest(buf, rec, cred.Uid)
	var resp *Response
	if rerr != nil {
		// Close before answering: once the peer has the answer, no
		// descriptor of its remains here.
		closeFiles(rec.files)
		resp = &Response{Error: rerr}
	} else {
		log = log.With("op", req.Op)
		if id := req.id(); id != nil {
			log = log.With("containerID", id.ContainerID, "ifName", id.IfName)
		}
		resp = s.call(ctx, log, deadline, req, rec.files)
	}
	s.writeResponse(conn, log, resp)
	switch {
	case rec.n == 0 && len(rec.files) == 0:
		// An empty record is what a peer that only probes (Listen) sends.
		log.Debug("connection without a request")
	case resp.Error != nil:
		log.Warn("request failed", "code", resp.Error.Code, "err", resp.Error.Error(), "took", time.Since(start))
	default:
		log.Info("request served", "took", time.Since(start))
	}
}

// checkRequest applies every check before the handler: peer uid, record
// and descriptor truncation, decoding and validation, descriptor count.
func (s *Server) checkRequest(buf []byte, rec recvResult, uid uint32) (*Request, *Error) {
	if !s.uids[uid] {
		return nil, &Error{Code: CodePermissionDenied, Msg: "permission denied", Details: fmt.Sprintf("uid %d may not use the agent socket", uid)}
	}
	if rec.truncated {
		return nil, tooLarge("request", rec.n)
	}
	if rec.fdsTruncated {
		if len(rec.files) >= MaxFDs {
			return nil, &Error{Code: CodeInvalidConfig, Msg: "too many file descriptors", Details: fmt.Sprintf("a request may carry at most %d", MaxFDs)}
		}
		return nil, &Error{Code: CodeTryAgainLater, Msg: "agent could not receive the file descriptors", Details: "out of descriptors?"}
	}
	req, err := DecodeRequest(buf[:rec.n])
	if err == nil {
		err = req.ValidateFDs(len(rec.files))
	}
	if err != nil {
		return nil, asError(err)
	}
	return req, nil
}

// call runs the handler, turning its error or panic into the response.
func (s *Server) call(ctx context.Context, log *slog.Logger, deadline time.Time, req *Request, files []*os.File) (resp *Response) {
	hctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), deadline)
	defer cancel()
	defer func() {
		if v := recover(); v != nil {
			log.Error("handler panicked", "panic", v, "stack", string(debug.Stack()))
			closeFiles(files)
			resp = &Response{Error: &Error{Code: CodeInternal, Msg: "agent internal error", Details: fmt.Sprintf("handler panicked: %v", v)}}
		}
	}()
	r, err := s.h.ServeAgent(hctx, req, files)
	if err != nil {
		return &Response{Error: asError(err)}
	}
	if r == nil {
		r = &Response{}
	}
	if r.Error == nil {
		if err := checkBody(req.Op, r); err != nil {
			log.Error("handler returned an incomplete response", "err", err)
			return &Response{Error: &Error{Code: CodeInternal, Msg: "agent internal error", Details: err.Error()}}
		}
	}
	return r
}

// writeResponse sends resp (with Version set) as one record.
func (s *Server) writeResponse(conn *net.UnixConn, log *slog.Logger, resp *Response) {
	out := *resp
	out.Version = Version
	b, err := json.Marshal(&out)
	if err == nil && len(b) > MaxMessageSize {
		err = fmt.Errorf("response is %d bytes, more than %d", len(b), MaxMessageSize)
	}
	if err != nil {
		log.Error("encode response", "err", err)
		b, _ = json.Marshal(&Response{Version: Version, Error: &Error{Code: CodeInternal, Msg: "agent internal error", Details: "cannot encode the response"}})
	}
	if _, err := conn.Write(b); err != nil {
		// The peer may be gone (for example a Listen probe).
		log.Debug("write response", "err", err)
	}
}

// id returns the attachment a request is about, or nil.
func (r *Request) id() *Attachment {
	var k Attachment
	switch {
	case r.Attach != nil:
		k = r.Attach.Key()
	case r.Detach != nil:
		k = r.Detach.Key()
	case r.Check != nil:
		k = r.Check.Key()
	default:
		return nil
	}
	return &k
}
