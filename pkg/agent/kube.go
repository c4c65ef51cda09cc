package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"k8s.io/client-go/kubernetes"

	"github.com/shm-cni/shm-cni/pkg/kube"
)

// Option configures an Agent beyond its Config.
type Option func(*Agent)

// WithKubeClient gives the agent a Kubernetes client (ConnectKube's): Run
// then keeps the host's routes to the other nodes' pod CIDRs in sync with
// the Node list, and the router's NetworkPolicy with the cluster's
// policies, pods and namespaces. A nil client is no option.
func WithKubeClient(c kubernetes.Interface) Option {
	return func(a *Agent) { a.kube = c }
}

// ConnectKube prepares cfg for New from the Kubernetes API, when
// cfg.NodeName is set: it connects with cfg.Kubeconfig or the in-cluster
// configuration and, when cfg.PodCIDRs is empty, fills it from the Node's
// spec.podCIDRs, waiting until they are allocated or ctx ends. It returns
// the client for WithKubeClient, or nil without a node name. Without any
// API configuration it is an error when the pod CIDRs are unknown, and
// otherwise logged: routes then come from cfg.PeerRoutes only.
func ConnectKube(ctx context.Context, cfg *Config, log *slog.Logger) (kubernetes.Interface, error) {
	if cfg.NodeName == "" {
		return nil, nil
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("connect to kubernetes: %w", err)
	}
	c, err := kube.NewClient(cfg.Kubeconfig)
	if errors.Is(err, kube.ErrNoConfig) {
		if len(cfg.PodCIDRs) == 0 {
			return nil, fmt.Errorf("connect to kubernetes: --pod-cidr not given and no Kubernetes API to read node %s's pod CIDRs from: %w", cfg.NodeName, err)
		}
		log.Warn("no Kubernetes API: pod CIDRs from --pod-cidr, routes to other nodes from --peer-routes only", "node", cfg.NodeName)
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("connect to kubernetes: %w", err)
	}
	if len(cfg.PodCIDRs) > 0 {
		return c, nil
	}
	cidrs, err := kube.WaitPodCIDRs(ctx, c, cfg.NodeName, log)
	if err != nil {
		return nil, fmt.Errorf("connect to kubernetes: %w", err)
	}
	log.Info("pod CIDRs from the node", "node", cfg.NodeName, "podCIDRs", cidrs)
	cfg.PodCIDRs = cidrs
	return c, nil
}

// startRoutes makes the host's routes to other nodes' pod CIDRs (tagged
// kube.RouteProtocol) match cfg.PeerRoutes and, with a Kubernetes client,
// the Node list, removing stale ones of an earlier agent. Without a client
// it syncs once, and an error stops the agent (the static routes are
// wrong); with one, a goroutine keeps syncing and retries failures until
// the returned stop is called. The routes stay when the agent stops: the
// host still reaches the other nodes' pods while it restarts.
func (a *Agent) startRoutes(ctx context.Context) (stop func(), err error) {
	nl, err := netlink.NewHandleAt(netns.NsHandle(a.hostNS.Fd()))
	if err != nil {
		return nil, fmt.Errorf("peer routes: netlink in host netns: %w", err)
	}
	log := a.log.With("component", "routes")
	rec, err := kube.NewReconciler(nl, log)
	if err != nil {
		nl.Close()
		return nil, fmt.Errorf("peer routes: %w", err)
	}
	if a.kube == nil {
		defer nl.Close()
		if err := rec.Sync(a.cfg.PeerRoutes); err != nil {
			return nil, fmt.Errorf("peer routes: %w", err)
		}
		return func() {}, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	s := &kube.RouteSyncer{
		Client:   a.kube,
		NodeName: a.cfg.NodeName,
		Static:   a.cfg.PeerRoutes,
		Sink:     rec,
		Log:      log,
	}
	go func() {
		defer close(done)
		defer nl.Close()
		if err := s.Run(ctx); err != nil {
			log.Error("route syncer stopped", "err", err)
		}
	}()
	return func() { cancel(); <-done }, nil
}

// startPolicy, with a Kubernetes client, starts the goroutine that feeds
// the router's NetworkPolicy (kube.PolicySyncer): the cluster's policies,
// pods and namespaces, the node's addresses, --service-cidr and the
// attachments' pods and addresses. Without one nothing is enforced. The
// returned stop ends the goroutine; the last snapshot stays installed.
func (a *Agent) startPolicy(ctx context.Context) (stop func()) {
	if a.kube == nil {
		return func() {}
	}
	log := a.log.With("component", "policy")
	s := &kube.PolicySyncer{
		Client:       a.kube,
		NodeName:     a.cfg.NodeName,
		ServiceCIDRs: a.cfg.ServiceCIDRs,
		Local:        a.localPods,
		Changed:      a.podsChanged,
		Sink:         a.router,
		Log:          log,
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.Run(ctx); err != nil {
			log.Error("policy syncer stopped: NetworkPolicy no longer follows the cluster", "err", err)
		}
	}()
	return func() { cancel(); <-done }
}

// localPods returns the attachments' pods and their addresses.
func (a *Agent) localPods() []kube.LocalPod {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]kube.LocalPod, 0, len(a.attachments))
	for _, att := range a.attachments {
		r := att.rec
		out = append(out, kube.LocalPod{Namespace: r.PodNS, Name: r.PodName, Addrs: r.Addrs})
	}
	return out
}

// attachmentsChanged tells the policy syncer that an attachment came or
// went.
func (a *Agent) attachmentsChanged() {
	select {
	case a.podsChanged <- struct{}{}:
	default:
	}
}
