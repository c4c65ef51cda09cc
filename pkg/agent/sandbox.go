package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// sandboxKind is the kind of a sandbox's link: a shared-memory queue pair
// per session, served on the link's own socket (shm.Dial).
type sandboxKind struct{}

// prepare implements linkKind.prepare: the queue sizes the conflist set,
// the MTU they carry and the link's socket, free.
func (sandboxKind) prepare(a *Agent, k linkspec.Key, rec *record, req *agentapi.AttachRequest) error {
	sizes := queue.Sizes{DataSize: req.Queue.DataSize, PipeSize: req.Queue.PipeSize, BufferSize: req.Queue.BufferSize}
	if err := sizes.Validate(); err != nil {
		return invalid("queue: %v", err)
	}
	if rec.MTU == 0 {
		rec.MTU = min(a.cfg.ShmMTU, int(sizes.MaxMTU()))
	}
	if err := sizes.CheckMTU(uint32(rec.MTU)); err != nil {
		return invalid("mtu: %v", err)
	}
	rec.Queue = &sizes
	sockPath := sandboxSocketPath(a.cfg.SandboxDir, k)
	if other := a.socketUser(sockPath); other != nil {
		return fmt.Errorf("socket %s is used by attachment %s", sockPath, *other)
	}
	return nil
}

// attach implements linkKind.attach: files are the first session's queue
// pair.
func (sandboxKind) attach(a *Agent, rec *record, files []*os.File) (podLink, error) {
	return a.attachSandbox(rec, files)
}

// readopt implements linkKind.readopt: the link gets its socket back, and
// a fresh pair at the sandbox's next connection.
func (sandboxKind) readopt(a *Agent, rec *record) (podLink, error) {
	// The sandbox lives in the pod's netns (its placeholder interface
	// too): without it, nobody will dial the link.
	if err := checkNetns(rec.Netns); err != nil {
		return nil, err
	}
	return a.startSandbox(rec, nil)
}

// orphan implements linkKind.orphan: CHECK passes, as for a link whose
// sandbox is away.
func (sandboxKind) orphan(*Agent, *record) podLink { return noLink{} }

// attachSandbox checks the queue pair of files and starts serving rec's
// sandbox socket with it.
func (a *Agent) attachSandbox(rec *record, files []*os.File) (*sandboxLink, error) {
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = fileFD(f)
	}
	pair, err := queue.PairFrom(fds)
	if err != nil {
		return nil, invalid("%v", err)
	}
	if err := queue.CheckPair(pair, *rec.Queue); err != nil {
		return nil, invalid("queue pair is not what attach.queue says: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	// A trial server endpoint checks the regions (memfds, sealed, sizes).
	trial, err := shm.NewServer(shm.Options{Pair: pair, MTU: uint32(rec.MTU), LinkAddress: GatewayMAC, PeerFD: -1})
	if err != nil {
		return nil, invalid("queue pair: %v", err)
	}
	trial.Close()
	trial.Wait()
	own, err := pair.Dup()
	if err != nil {
		return nil, fmt.Errorf("keep queue pair: %w", err)
	}
	if rec.PodMAC == "" {
		rec.PodMAC = net.HardwareAddr(podMACFor(rec.Addrs)).String()
	}
	return a.startSandbox(rec, &own)
}

// startSandbox serves rec's sandbox socket under the sandbox directory;
// pair (owned from the call on) is the first session's, or nil.
func (a *Agent) startSandbox(rec *record, pair *queue.Pair) (*sandboxLink, error) {
	id := rec.key().String()
	path := sandboxSocketPath(a.cfg.SandboxDir, rec.key())
	tuning := serverTuning{limit: a.cfg.LinkRxLimit, poll: a.cfg.pollOption(), txWait: a.cfg.ShmTxWait}
	return newSandboxLink(path, id, rec, pair, tuning, a.router, a.log.With("link", id))
}

// sandboxLink is a sandbox's shared-memory link (a podLink): it accepts
// the sandbox's connections on the per-link socket and, for each, gives the
// sandbox a queue pair and attaches the agent's end of it to the router
// while the connection lives.
//
// Sessions: a connection while no sandbox holds the link starts one (the
// link config and a queue pair go to the sandbox, the server endpoint joins
// the router). The session ends when the sandbox hangs up (the endpoint's
// OnClosed, or found at the next connection) or breaks the protocol; the
// link leaves the router and the next connection gets a fresh pair. A
// connection while a session lives is refused.
type sandboxLink struct {
	linkID string            // immutable
	link   router.Link       // the router link's addressing; immutable
	config shm.LinkConfig    // what each sandbox gets; immutable
	sizes  queue.Sizes       // immutable
	tuning serverTuning      // each session's; immutable
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

// newSandboxLink listens on path and starts accepting sandboxes. pair, if not
// nil, is the first session's queue pair; the link owns it from the call
// on, whether it succeeds or not.
// serverTuning is how a sandbox link's server endpoints run: their
// shm.Options RxLimit, Poll and TxWait.
type serverTuning struct {
	limit        endpoint.RxLimit
	poll, txWait time.Duration
}

func newSandboxLink(path, linkID string, rec *record, pair *queue.Pair, tuning serverTuning, r *router.Router, log *slog.Logger) (*sandboxLink, error) {
	ln, err := agentapi.Listen(path)
	if err != nil {
		if pair != nil {
			pair.Close()
		}
		return nil, fmt.Errorf("sandbox socket: %w", err)
	}
	s := &sandboxLink{
		linkID: linkID,
		link:   rec.routerLink(),
		config: linkConfigFor(rec),
		sizes:  *rec.Queue,
		tuning: tuning,
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
func (s *sandboxLink) acceptLoop() {
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
func (s *sandboxLink) serve(conn *net.UnixConn) {
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
				// As the link config offers (linkConfigFor).
				TxGSO: true,
				// As the link config offers too.
				RxGSO:   true,
				RxLimit: s.tuning.limit,
				Poll:    s.tuning.poll,
				TxWait:  s.tuning.txWait,
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
func (s *sandboxLink) sessionLost(srv *shm.Server, reason error) {
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
func (s *sandboxLink) endSessionLocked(reason string) {
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
func (s *sandboxLink) removeLinkLocked() {
	if err := s.router.RemoveLink(s.linkID); err != nil {
		s.log.Warn("remove sandbox link", "err", err)
	}
}

// release implements podLink.release: stop gave back everything.
func (s *sandboxLink) release() {}

// stop ends any session, closes and removes the socket, waits for the
// link's goroutines and closes the prepared pair. It is idempotent.
func (s *sandboxLink) stop() {
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
func (s *sandboxLink) stats() (endpoint.StatsSnapshot, bool) {
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
func (s *sandboxLink) routerStats() (router.LinkStats, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ls, err := s.router.LinkStats(s.linkID)
	if s.server == nil || err != nil {
		return s.pastRouter, false
	}
	return s.pastRouter.Add(ls), true
}

// check implements podLink.check: a sandbox link waits for its sandbox,
// whether one is connected or not.
func (s *sandboxLink) check() error { return nil }

// answer implements podLink.answer: the sandbox takes the MAC the agent
// chose for it, and dials the link's socket.
func (s *sandboxLink) answer(resp *agentapi.AttachResponse) {
	resp.MAC = s.config.MAC
	resp.SocketPath = s.path
}

// status implements podLink.status: the counters summed over the
// sandbox's sessions; up while one is attached.
func (s *sandboxLink) status(st *LinkStatus) {
	st.SocketPath = s.path
	ls, up := s.routerStats()
	st.Up, st.Router = up, &ls
	es, _ := s.stats()
	st.Endpoint = &es
}

// socketPath implements podLink.socketPath.
func (s *sandboxLink) socketPath() string { return s.path }

// podMACFor derives a shm link's pod MAC from its first address: 02:53
// (locally administered unicast, 'S') then the address's last four bytes.
// Every pod link is its own L2 segment with the router, so the MAC only has
// to differ from GatewayMAC, which the 02 prefix guarantees.
func podMACFor(addrs []netip.Addr) tcpip.LinkAddress {
	mac := make(net.HardwareAddr, 6)
	mac[0], mac[1] = 0x02, 0x53
	if len(addrs) > 0 {
		b := addrs[0].AsSlice()
		binary.BigEndian.PutUint32(mac[2:], binary.BigEndian.Uint32(b[len(b)-4:]))
	}
	return tcpip.LinkAddress(mac)
}

// linkConfigFor is what a sandbox gets for rec.
func linkConfigFor(rec *record) shm.LinkConfig {
	c := shm.LinkConfig{
		Version:    shm.LinkConfigVersion,
		MAC:        rec.PodMAC,
		GatewayMAC: net.HardwareAddr(GatewayMAC).String(),
		MTU:        uint32(rec.MTU),
		// The server takes TCP super-packets (shm.Options.TxGSO) and
		// sends partial checksums to a client that takes them
		// (shm.Options.RxGSO).
		TxGSO: true,
		RxGSO: true,
	}
	if rec.Queue != nil {
		c.BufferSize = rec.Queue.BufferSize
	}
	for _, a := range rec.Addrs {
		gw, dst := router.GatewayV6, netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		if a.Is4() {
			gw, dst = router.GatewayV4, netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		}
		c.Addresses = append(c.Addresses, netip.PrefixFrom(a, a.BitLen()))
		c.Routes = append(c.Routes, shm.LinkRoute{Dst: dst, GW: gw})
		c.Gateways = append(c.Gateways, gw)
	}
	return c
}
