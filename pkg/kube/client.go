package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrNoConfig is NewClient's error when neither a kubeconfig nor an
// in-cluster configuration is available.
var ErrNoConfig = errors.New("no Kubernetes API configuration: no kubeconfig given and not running in a cluster")

// userAgent names the agent to the API server.
const userAgent = "shm-agent"

// NewClient returns a clientset for the kubeconfig file, or the in-cluster
// configuration (service account token, KUBERNETES_SERVICE_HOST) when
// kubeconfig is empty; ErrNoConfig when that is missing too.
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
	} else {
		cfg, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) || errors.Is(err, os.ErrNotExist) {
			return nil, ErrNoConfig
		}
		if err != nil {
			return nil, fmt.Errorf("in-cluster config: %w", err)
		}
	}
	cfg.UserAgent = userAgent
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return c, nil
}

// retryInterval is how long WaitPodCIDRs waits after an API error before
// it asks again.
const retryInterval = 2 * time.Second

// WaitPodCIDRs returns the Node's pod CIDRs, waiting (a watch on the one
// Node) until the controller manager allocated them, the Node exists, or
// ctx ends. API errors are logged and retried.
func WaitPodCIDRs(ctx context.Context, c kubernetes.Interface, node string, log *slog.Logger) ([]netip.Prefix, error) {
	nodes := c.CoreV1().Nodes()
	for {
		n, err := nodes.Get(ctx, node, metav1.GetOptions{})
		switch {
		case err == nil:
			cidrs, err := NodePodCIDRs(n)
			if err != nil {
				return nil, err
			}
			if len(cidrs) > 0 {
				return cidrs, nil
			}
			log.Info("waiting for the node's pod CIDRs (spec.podCIDRs)", "node", node)
			cidrs, err = watchPodCIDRs(ctx, nodes, node, n.ResourceVersion)
			if len(cidrs) > 0 || ctx.Err() != nil {
				return cidrs, err
			}
			if err == nil {
				continue // the watch ended: get again
			}
			// A watch that fails (say, no watch permission) is retried
			// after retryInterval like a failed get, not at once.
			log.Warn("watching the node", "node", node, "err", err)
		case apierrors.IsNotFound(err):
			log.Info("waiting for the node to be registered", "node", node)
		case ctx.Err() != nil:
		default:
			log.Warn("getting the node", "node", node, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pod CIDRs of node %s: %w", node, ctx.Err())
		case <-time.After(retryInterval):
		}
	}
}

// watchPodCIDRs watches the Node from resourceVersion until it has pod
// CIDRs; nil, nil when the watch ended without.
func watchPodCIDRs(ctx context.Context, nodes interface {
	Watch(context.Context, metav1.ListOptions) (watch.Interface, error)
}, node, resourceVersion string) ([]netip.Prefix, error) {
	w, err := nodes.Watch(ctx, metav1.ListOptions{
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", node).String(),
		ResourceVersion: resourceVersion,
	})
	if err != nil {
		return nil, err
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pod CIDRs of node %s: %w", node, ctx.Err())
		case ev, ok := <-w.ResultChan():
			if !ok {
				return nil, nil
			}
			n, isNode := ev.Object.(*corev1.Node)
			if !isNode || n.Name != node || (ev.Type != watch.Added && ev.Type != watch.Modified) {
				continue
			}
			cidrs, err := NodePodCIDRs(n)
			if err != nil || len(cidrs) > 0 {
				return cidrs, err
			}
		}
	}
}
