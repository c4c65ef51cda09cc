package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// RouteSink makes the host's routes match a list; *Reconciler is one.
type RouteSink interface {
	Sync(want []Route) error
}

// Defaults of RouteSyncer.
const (
	// DefaultResync is how often the syncer reconciles without a change:
	// it puts back routes someone else removed.
	DefaultResync = 5 * time.Minute
	// maxRetry bounds the wait before a failed sync is retried; the first
	// retry comes after a second, each next one after twice as long.
	maxRetry = time.Minute
)

// RouteSyncer keeps a RouteSink in sync with the Node list: the routes
// DesiredRoutes computes for NodeName, merged with Static.
type RouteSyncer struct {
	// Client reads Nodes (list and watch). Required.
	Client kubernetes.Interface
	// NodeName is this node's name. Required.
	NodeName string
	// Static routes are kept too, and win over learned ones.
	Static []Route
	// Sink applies the routes. Required.
	Sink RouteSink
	// Log receives what was skipped and why syncs failed. Required.
	Log *slog.Logger
	// Resync is the informer's resync period; 0 means DefaultResync.
	Resync time.Duration
	// OnSync, if set, is called after every sync with the routes synced
	// and the sink's error.
	OnSync func(routes []Route, err error)
}

// Run syncs once the informer's cache is filled and again after every
// change of a Node, every Resync, and after a failure (with backoff),
// until ctx ends. Its goroutines are gone when it returns.
func (s *RouteSyncer) Run(ctx context.Context) error {
	if s.Client == nil || s.NodeName == "" || s.Sink == nil || s.Log == nil {
		return errors.New("route syncer: Client, NodeName, Sink and Log are required")
	}
	resync := s.Resync
	if resync == 0 {
		resync = DefaultResync
	}
	ctx, cancel := context.WithCancel(ctx)
	factory := informers.NewSharedInformerFactory(s.Client, resync)
	// Shutdown waits for the informer's goroutines, which end with ctx:
	// cancel first, whatever the reason Run returns.
	defer func() {
		cancel()
		factory.Shutdown()
	}()
	nodes := factory.Core().V1().Nodes()
	// One pending sync at most: changes that arrive meanwhile are folded
	// into it.
	kick := make(chan struct{}, 1)
	trigger := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	if _, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { trigger() },
		UpdateFunc: func(old, cur any) {
			if routingChanged(old, cur) {
				trigger()
			}
		},
		DeleteFunc: func(any) { trigger() },
	}); err != nil {
		return fmt.Errorf("route syncer: %w", err)
	}
	lister := nodes.Lister()
	factory.Start(ctx.Done())
	for typ, ok := range factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("route syncer: %v cache did not sync", typ)
		}
	}
	s.Log.Info("node informer synced", "node", s.NodeName)

	retry := time.Duration(0)
	var timer <-chan time.Time
	trigger()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		case <-timer:
		}
		timer = nil
		list, err := lister.List(labels.Everything())
		if err != nil {
			return fmt.Errorf("route syncer: list nodes: %w", err)
		}
		err = s.syncOnce(list)
		if err == nil {
			retry = 0
			continue
		}
		retry = min(max(2*retry, time.Second), maxRetry)
		s.Log.Warn("route sync failed, retrying", "in", retry, "err", err)
		timer = time.After(retry)
	}
}

// syncOnce computes the routes for list and applies them.
func (s *RouteSyncer) syncOnce(list []*corev1.Node) error {
	learned, problems := DesiredRoutes(s.NodeName, list)
	routes, more := MergeRoutes(s.Static, learned)
	for _, p := range append(problems, more...) {
		s.Log.Debug("route skipped", "reason", p)
	}
	err := s.Sink.Sync(routes)
	if s.OnSync != nil {
		s.OnSync(routes, err)
	}
	return err
}

// routingChanged reports whether a Node update matters to the routes: its
// pod CIDRs or addresses changed, or it is the informer's periodic resync
// (same object), which puts back routes someone removed. Status heartbeats
// and other changes do not trigger a sync.
func routingChanged(old, cur any) bool {
	o, ok1 := old.(*corev1.Node)
	n, ok2 := cur.(*corev1.Node)
	if !ok1 || !ok2 || o.ResourceVersion == n.ResourceVersion {
		return true
	}
	return o.Spec.PodCIDR != n.Spec.PodCIDR || !slices.Equal(o.Spec.PodCIDRs, n.Spec.PodCIDRs) ||
		!slices.Equal(o.Status.Addresses, n.Status.Addresses)
}
