package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// shmLink serves a sandbox link: it accepts the sandbox's connections on the
// per-link socket and, for each, gives the sandbox a queue pair and attaches
// the agent's end of it to the router while the connection lives.
//
// Sessions: a connection while no sandbox holds the link starts one (the
// link config and a queue pair go to the sandbox, the server endpoint joins
// the router). The session ends when the sandbox hangs up (the endpoint's
// OnClosed, or found at the next connection) or breaks the protocol; the
// link leaves the router and the next connection gets a fresh pair. A
// connection while a session lives is refused.
type shmLink struct {
	linkID string            // immutable
	link   router.Link       // the router link's addressing; immutable
	config shm.LinkConfig    // what each sandbox gets; immutable
	sizes  queue.Sizes       // immutable
	limit  endpoint.RxLimit  // each session's receive limit; immutable
	path   string            // the socket's path; immutable
	router *router.Router    // immutable
	log    *slog.Logger      // immutable
	ln     *net.UnixListener // closed by stop; immutable
	// sessionPace paces new sessions (see sessionRate); used by the
	// accept loop only.
	sessionPace *rate.Limiter
	stopping    chan struct{} // closed by stop

	// wg counts the accept loop and the session-end goroutines.
	wg sync.WaitGroup

	// mu guards the fields below and serialises sessions.
	mu sync.Mutex
	// pastEndpoint and pastRouter sum the counters of ended sessions, so
	// that a link's counters (a cut-off sandbox's violations above all)
	// outlive the session.
	// +checklocks:mu
	pastEndpoint endpoint.StatsSnapshot
	// +checklocks:mu
	pastRouter router.LinkStats
	// pair is the queue pair the next session uses, the agent's copy; nil
	// when none is prepared (one is made at the next connection).
	// +checklocks:mu
	pair *queue.Pair
	// server and conn are the live session's endpoint and connection.
	// +checklocks:mu
	server *shm.Server
	// +checklocks:mu
	conn *net.UnixConn
	// sessions counts sessions started.
	// +checklocks:mu
	sessions uint64
	// +checklocks:mu
	closed bool
}

// sandboxSocketPath is the per-link socket of k under dir.
func sandboxSocketPath(dir string, k linkspec.Key) string {
	return filepath.Join(dir, k.ContainerID+"-"+k.IfName+".sock")
}

// newShmLink listens on path and starts accepting sandboxes. pair, if not
// nil, is the first session's queue pair; the link owns it from the call
// on, whether it succeeds or not.
func newShmLink(path, linkID string, rec *record, pair *queue.Pair, limit endpoint.RxLimit, r *router.Router, log *slog.Logger) (*shmLink, error) {
	ln, err := agentapi.Listen(path)
	if err != nil {
		if pair != nil {
			pair.Close()
		}
		return nil, fmt.Errorf("sandbox socket: %w", err)
	}
	s := &shmLink{
		linkID: linkID,
		link:   router.Link{Addrs: rec.Addrs, PodMAC: macOf(rec.PodMAC), GatewayMAC: GatewayMAC},
		config: linkConfigFor(rec),
		sizes:  *rec.Queue,
		limit:  limit,
		path:   path,
		router: r,
		log:    log,
		ln:     ln,
		pair:   pair,

		sessionPace: rate.NewLimiter(sessionRate, sessionBurst),
		stopping:    make(chan struct{}),
	}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// A sandbox that connects and hangs up over and over makes the agent build
// and tear down a queue pair and a router link each time. Sessions of one
// link are paced: after a burst, at most sessionRate a second; further
// connections wait in the socket's backlog. A sandbox reconnects when it
// restarts, far less often.
const (
	sessionRate  = rate.Limit(20)
	sessionBurst = 20
)

// acceptLoop serves connections one at a time until stop closes the
// listener.
func (s *shmLink) acceptLoop() {
	defer s.wg.Done()
	for {
		if d := s.sessionPace.Reserve().Delay(); d > 0 {
			s.log.Debug("sandbox sessions paced", "wait", d)
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-s.stopping:
				t.Stop()
				return
			}
		}
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if !closed && !errors.Is(err, net.ErrClosed) {
				s.log.Error("sandbox socket: accept failed; the link takes no more sandboxes", "err", err)
			}
			return
		}
		s.serve(conn)
	}
}

// serve starts a session on conn or refuses it.
func (s *shmLink) serve(conn *net.UnixConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	refuse := func(reason string) {
		s.log.Warn("sandbox connection refused", "reason", reason)
		if err := shm.SendDialError(conn, reason); err != nil {
			s.log.Debug("send refusal", "err", err)
		}
		conn.Close()
	}
	if s.closed {
		refuse("the link is being removed")
		return
	}
	if s.server != nil {
		if !peerHungUp(s.conn) {
			refuse("another sandbox holds this link")
			return
		}
		// The sandbox hung up and its OnClosed is still on its way.
		s.endSessionLocked("sandbox hung up")
	}
	if s.pair == nil {
		p, err := queue.NewPair(s.sizes)
		if err != nil {
			refuse("agent cannot create a queue pair")
			s.log.Error("new queue pair", "err", err)
			return
		}
		s.pair = &p
	}
	var srv *shm.Server
	var serr error
	pair := *s.pair
	rc, err := conn.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) {
			srv, serr = shm.NewServer(shm.Options{
				Pair:        pair,
				MTU:         s.config.MTU,
				LinkAddress: GatewayMAC,
				PeerFD:      int(fd),
				// The router forwards only: keep forwarded checksums.
				Forwarding: true,
				RxLimit:    s.limit,
				// OnClosed runs on the endpoint's goroutine and must
				// not wait for it: end the session on our own.
				OnClosed: func(reason error) {
					s.wg.Add(1)
					go s.sessionLost(srv, reason)
				},
				Logger: s.log,
			})
		})
	}
	if err == nil {
		err = serr
	}
	if err != nil {
		refuse("agent cannot serve the queue pair")
		s.log.Error("new shm server endpoint", "err", err)
		return
	}
	if err := s.router.AddLink(s.linkID, srv, s.link); err != nil {
		srv.Close()
		srv.Wait()
		refuse("agent cannot attach the link")
		s.log.Error("attach sandbox link", "err", err)
		return
	}
	if err := shm.SendLinkConfig(conn, s.config, *s.pair); err != nil {
		s.log.Warn("send link config to sandbox", "err", err)
		s.removeLinkLocked()
		conn.Close()
		// The sandbox may have mapped part of it: never reuse it.
		s.pair.Close()
		s.pair = nil
		return
	}
	// The sandbox and the server endpoint hold their own descriptors.
	s.pair.Close()
	s.pair = nil
	s.server, s.conn = srv, conn
	s.sessions++
	s.log.Info("sandbox connected", "session", s.sessions)
}

// sessionLost ends the session of srv after its endpoint stopped on its own
// (the sandbox hung up or broke the protocol).
func (s *shmLink) sessionLost(srv *shm.Server, reason error) {
	defer s.wg.Done()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.server != srv {
		return // already ended (a new connection found it gone, or stop)
	}
	s.endSessionLocked(reason.Error())
}

// endSessionLocked removes the session's link and closes its connection.
//
// +checklocks:s.mu
func (s *shmLink) endSessionLocked(reason string) {
	if ls, err := s.router.LinkStats(s.linkID); err == nil {
		s.pastRouter = s.pastRouter.Add(ls)
	}
	s.removeLinkLocked()
	// Removed: the endpoint has stopped, its counters are final.
	s.pastEndpoint = s.pastEndpoint.Add(s.server.Stats().Snapshot())
	s.conn.Close()
	s.server, s.conn = nil, nil
	s.log.Info("sandbox disconnected", "reason", reason)
}

// removeLinkLocked removes the link from the router; when it returns the
// endpoint has released the pair and stopped.
//
// +checklocks:s.mu
func (s *shmLink) removeLinkLocked() {
	if err := s.router.RemoveLink(s.linkID); err != nil {
		s.log.Warn("remove sandbox link", "err", err)
	}
}

// stop ends any session, closes and removes the socket, waits for the
// link's goroutines and closes the prepared pair. It is idempotent.
func (s *shmLink) stop() {
	s.mu.Lock()
	if !s.closed {
		close(s.stopping)
	}
	s.closed = true
	if s.server != nil {
		s.endSessionLocked("link removed")
	}
	s.mu.Unlock()
	// Closing the listener unlinks the socket file.
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		s.log.Warn("close sandbox socket", "err", err)
	}
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pair != nil {
		s.pair.Close()
		s.pair = nil
	}
}

// stats returns the live session's endpoint counters.
func (s *shmLink) stats() (endpoint.StatsSnapshot, bool) {
	s.mu.Lock()
	srv, past := s.server, s.pastEndpoint
	s.mu.Unlock()
	if srv == nil {
		return past, true
	}
	return past.Add(srv.Stats().Snapshot()), true
}

// routerStats returns the link's router counters summed over every session,
// and whether a session is attached now.
func (s *shmLink) routerStats() (router.LinkStats, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ls, err := s.router.LinkStats(s.linkID)
	if s.server == nil || err != nil {
		return s.pastRouter, false
	}
	return s.pastRouter.Add(ls), true
}
