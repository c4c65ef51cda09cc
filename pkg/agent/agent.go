package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/containernetworking/plugins/pkg/ns"
	"k8s.io/client-go/kubernetes"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/ipam"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// GatewayMAC is the MAC the router uses on every pod link, the link-layer
// address of the gateways 169.254.1.1 and fe80::1. One fixed locally
// administered unicast address for every agent, as Calico does: every pod
// link is its own L2 segment, so it never meets another agent's.
var GatewayMAC = tcpip.LinkAddress("\xee\xee\xee\xee\xee\xee")

// httpReadHeaderTimeout bounds a metrics client's request header.
const httpReadHeaderTimeout = 10 * time.Second

// Agent is the node agent. Create it with New, run it with Run.
//
// LOCK ORDERING: opMu > mu > sandboxLink.mu > router's locks.
type Agent struct {
	cfg     Config         // immutable
	log     *slog.Logger   // immutable
	router  *router.Router // immutable
	metrics *metrics       // immutable
	// hostNS is the host network namespace (New's); closed by Run.
	// Immutable.
	hostNS ns.NetNS
	// kube, when set (WithKubeClient), keeps the routes to the other
	// nodes' pod CIDRs in sync with the Node list and feeds the router's
	// NetworkPolicy. Immutable.
	kube kubernetes.Interface
	// podsChanged tells the policy syncer that the attachments changed
	// (capacity 1: a pending signal covers later changes). Immutable.
	podsChanged chan struct{}

	// ipam and store are set by Run before it serves and never change
	// after; handlers only run while Run serves.
	ipam  *ipam.Allocator
	store *store

	// opMu serialises every change of the attachments: attach, detach,
	// check, gc, re-adoption and shutdown.
	opMu sync.Mutex

	// mu guards the fields below.
	mu sync.Mutex
	// +checklocks:mu
	attachments map[linkspec.Key]*attachment
	// ready is set while the router runs and the agent socket serves.
	// +checklocks:mu
	ready bool
	// metricsAddr is the bound HTTP address, once Run listens.
	// +checklocks:mu
	metricsAddr net.Addr

	// readyCh is closed when Run first becomes ready.
	readyCh chan struct{}
	// running is set by the first Run.
	running atomic.Bool
	// wg counts background goroutines: link removals after a TAP device
	// went away.
	wg sync.WaitGroup
}

var _ agentapi.Handler = (*Agent)(nil)

// New validates cfg and creates the agent and its router in the calling
// thread's network namespace, which becomes the host namespace. It changes
// nothing on the host and opens no file: Run does.
func New(cfg Config, log *slog.Logger, opts ...Option) (*Agent, error) {
	if log == nil {
		return nil, errors.New("new agent: nil logger")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("new agent: %w", err)
	}
	if len(cfg.PodCIDRs) == 0 {
		return nil, fmt.Errorf("new agent: --pod-cidr not given and none read from node %q (see ConnectKube)", cfg.NodeName)
	}
	hostNS, err := ns.GetCurrentNS()
	if err != nil {
		return nil, fmt.Errorf("new agent: host netns: %w", err)
	}
	r, err := router.New(router.Config{
		PodCIDRs:          cfg.PodCIDRs,
		ClusterCIDRs:      cfg.ClusterCIDRs,
		UplinkName:        cfg.Uplink,
		UplinkMTU:         cfg.MTU,
		Masquerade:        cfg.Masquerade,
		NoFastPath:        !cfg.FastPath,
		OneCopy:           cfg.OneCopy,
		ForwardAccept:     cfg.ForwardAccept,
		IPForward:         cfg.IPForward,
		HostCheckInterval: cfg.HostCheckInterval,
		UplinkPoll:        cfg.pollOption(),
		PolicyQueue:       uint16(cfg.PolicyQueue),
	}, log.With("component", "router"))
	if err != nil {
		hostNS.Close()
		return nil, fmt.Errorf("new agent: %w", err)
	}
	a := &Agent{
		cfg:         cfg,
		log:         log,
		router:      r,
		hostNS:      hostNS,
		attachments: make(map[linkspec.Key]*attachment),
		readyCh:     make(chan struct{}),
		podsChanged: make(chan struct{}, 1),
	}
	for _, o := range opts {
		o(a)
	}
	a.metrics = newMetrics(a)
	return a, nil
}

// Ready returns a channel closed once Run serves.
func (a *Agent) Ready() <-chan struct{} { return a.readyCh }

// MetricsAddr returns the address the HTTP server listens on, or nil before
// Run listens or when it is disabled.
func (a *Agent) MetricsAddr() net.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.metricsAddr
}

// isReady reports whether the agent takes attachments.
func (a *Agent) isReady() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ready
}

func (a *Agent) setReady(v bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ready = v
}

// Run starts the router, opens the state, re-adopts the attachments found
// there and serves until ctx is done; then it shuts down gracefully (see the
// package doc). It returns the first error that stopped it, or nil after ctx
// ended it. Run may be called once; the router is closed when it returns.
func (a *Agent) Run(ctx context.Context) (err error) {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("run agent: already run")
	}
	defer a.hostNS.Close()
	defer func() {
		if cerr := a.router.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	if err := a.router.Start(); err != nil {
		return fmt.Errorf("run agent: %w", err)
	}
	stopRoutes, err := a.startRoutes(ctx)
	if err != nil {
		return fmt.Errorf("run agent: %w", err)
	}
	defer stopRoutes()
	if a.store, err = openStore(a.cfg.StateDir); err != nil {
		return fmt.Errorf("run agent: %w", err)
	}
	a.ipam, err = ipam.Open(filepath.Join(a.cfg.StateDir, ipamDir), a.cfg.PodCIDRs, ipam.Options{Logger: a.log.With("component", "ipam")})
	if err != nil {
		return fmt.Errorf("run agent: %w", err)
	}
	defer func() {
		if cerr := a.ipam.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	// Links go before the router closes and the IPAM state is closed, and
	// after the servers stopped (registered below, so run first).
	defer a.stopAll()
	if err := a.readopt(); err != nil {
		return fmt.Errorf("run agent: %w", err)
	}
	// After re-adoption, so that the first snapshot knows the local pods;
	// stopped before the links.
	stopPolicy := a.startPolicy(ctx)
	defer stopPolicy()

	ln, err := agentapi.Listen(a.cfg.SocketPath)
	if err != nil {
		return fmt.Errorf("run agent: %w", err)
	}
	srv, err := agentapi.NewServer(ln, a, a.log.With("component", "agentapi"))
	if err != nil {
		ln.Close()
		return fmt.Errorf("run agent: %w", err)
	}
	var hs *http.Server
	var hl net.Listener
	if a.cfg.MetricsAddr != "" {
		hl, err = net.Listen("tcp", a.cfg.MetricsAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("run agent: metrics: %w", err)
		}
		hs = &http.Server{
			Handler:           a.httpHandler(),
			ReadHeaderTimeout: httpReadHeaderTimeout,
			ErrorLog:          slog.NewLogLogger(a.log.Handler(), slog.LevelWarn),
		}
		a.mu.Lock()
		a.metricsAddr = hl.Addr()
		a.mu.Unlock()
	}

	serveCtx, stopServing := context.WithCancel(ctx)
	defer stopServing()
	errc := make(chan error, 2)
	var serving sync.WaitGroup
	serving.Add(1)
	go func() {
		defer serving.Done()
		if err := srv.Serve(serveCtx); err != nil {
			errc <- fmt.Errorf("agent socket: %w", err)
		}
	}()
	if hs != nil {
		serving.Add(1)
		go func() {
			defer serving.Done()
			if err := hs.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics server: %w", err)
			}
		}()
	}
	a.setReady(true)
	close(a.readyCh)
	a.log.Info("agent ready", "socket", a.cfg.SocketPath, "metrics", a.cfg.MetricsAddr,
		"podCIDRs", a.cfg.PodCIDRs, "attachments", a.count())

	// Only now that it serves: the CNI binary and conflist (cniinstall.go).
	if err = a.installCNI(); err != nil {
		err = fmt.Errorf("run agent: %w", err)
	} else {
		select {
		case <-ctx.Done():
		case err = <-errc:
			a.log.Error("agent stopping on error", "err", err)
		}
	}
	a.setReady(false)
	// Stop accepting and answer the requests in flight, then the HTTP
	// server (no request of it changes anything: close at once).
	stopServing()
	srv.Close()
	if hs != nil {
		hs.Close()
	}
	serving.Wait()
	a.log.Info("agent stopped serving")
	return err
}

// count returns the number of attachments.
func (a *Agent) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.attachments)
}

// stopAll stops every attachment's link, socket and descriptors, keeping
// their records and addresses for the next agent, and waits for the
// background goroutines.
func (a *Agent) stopAll() {
	a.opMu.Lock()
	a.mu.Lock()
	atts := make([]*attachment, 0, len(a.attachments))
	for _, att := range a.attachments {
		atts = append(atts, att)
	}
	a.attachments = make(map[linkspec.Key]*attachment)
	a.mu.Unlock()
	for _, att := range atts {
		att.stop()
	}
	a.opMu.Unlock()
	a.wg.Wait()
}
