package kube

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// syncResult is one sync the syncer reported.
type syncResult struct {
	routes []Route
	err    error
}

// TestRouteSyncer: the syncer keeps real routes in a fresh netns in step
// with the Node list: the peers' pod CIDRs at start (a stale route of ours
// removed, the static route kept), a changed InternalIP, a new node and a
// deleted one; and it returns once its context ends.
//
// The API server is client-go's fake clientset: no API server runs here.
// Everything else (informer, reconciler, netlink, kernel routes) is real.
func TestRouteSyncer(t *testing.T) {
	h := newHostNS(t)
	h.addRoute(t, "10.244.9.0/24", "192.0.2.99", RouteProtocol) // stale
	rec, err := NewReconciler(h.nl, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(
		node("a", []string{"10.244.0.0/24", "fd00:10:244::/64"}, "192.0.2.1", "2001:db8::1"),
		node("b", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, "192.0.2.2", "2001:db8::2"),
	)
	results := make(chan syncResult, 64)
	s := &RouteSyncer{
		Client:   client,
		NodeName: "a",
		Static:   routes("10.250.0.0/24=192.0.2.250"),
		Sink:     rec,
		Log:      testutil.Logger(t),
		OnSync:   func(r []Route, err error) { results <- syncResult{r, err} },
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})

	// waitFor reads syncs until one synced want without error, then checks
	// the kernel's routes.
	waitFor := func(t *testing.T, want []Route) {
		t.Helper()
		guard := time.After(hangGuard)
		var last syncResult
		for {
			select {
			case r := <-results:
				last = r
				if r.err == nil && fmt.Sprint(r.routes) == fmt.Sprint(want) {
					got, err := rec.Routes()
					if err != nil {
						t.Fatal(err)
					}
					if fmt.Sprint(got) != fmt.Sprint(want) {
						t.Fatalf("kernel routes %v after syncing %v", got, want)
					}
					return
				}
			case err := <-done:
				t.Fatalf("Run returned early: %v", err)
			case <-guard:
				t.Fatalf("no sync of %v (last: %v, %v)", want, last.routes, last.err)
			}
		}
	}
	nodes := client.CoreV1().Nodes()
	update := func(t *testing.T, n *corev1.Node) {
		t.Helper()
		if _, err := nodes.Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("start", func(t *testing.T) {
		waitFor(t, routes("10.244.1.0/24=192.0.2.2", "10.250.0.0/24=192.0.2.250", "fd00:10:244:1::/64=2001:db8::2"))
	})
	t.Run("InternalIP changed", func(t *testing.T) {
		update(t, node("b", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, "192.0.2.22", "2001:db8::22"))
		waitFor(t, routes("10.244.1.0/24=192.0.2.22", "10.250.0.0/24=192.0.2.250", "fd00:10:244:1::/64=2001:db8::22"))
	})
	t.Run("node added", func(t *testing.T) {
		if _, err := nodes.Create(context.Background(), node("c", []string{"10.244.2.0/24"}, "192.0.2.3"), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, routes("10.244.1.0/24=192.0.2.22", "10.244.2.0/24=192.0.2.3", "10.250.0.0/24=192.0.2.250", "fd00:10:244:1::/64=2001:db8::22"))
	})
	t.Run("node deleted", func(t *testing.T) {
		if err := nodes.Delete(context.Background(), "b", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, routes("10.244.2.0/24=192.0.2.3", "10.250.0.0/24=192.0.2.250"))
	})
	t.Run("stops", func(t *testing.T) {
		cancel()
		select {
		case err := <-done:
			done <- err // for the cleanup
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(hangGuard):
			t.Fatal("Run did not return after its context ended")
		}
	})
}

// TestWaitPodCIDRs: the node's pod CIDRs once they are allocated: at once
// when set, after an update when not yet, and the context's error when
// they never come. (The API server is client-go's fake clientset.)
func TestWaitPodCIDRs(t *testing.T) {
	log := testutil.Logger(t)
	want := []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24"), netip.MustParsePrefix("fd00:10:244:3::/64")}

	t.Run("allocated", func(t *testing.T) {
		c := fake.NewClientset(node("a", []string{"10.244.3.0/24", "fd00:10:244:3::/64"}, "192.0.2.1"))
		got, err := WaitPodCIDRs(context.Background(), c, "a", log)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("WaitPodCIDRs = %v, %v; want %v", got, err, want)
		}
	})
	t.Run("allocated later", func(t *testing.T) {
		c := fake.NewClientset(node("a", nil, "192.0.2.1"))
		ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
		defer cancel()
		type res struct {
			p   []netip.Prefix
			err error
		}
		ch := make(chan res, 1)
		go func() {
			p, err := WaitPodCIDRs(ctx, c, "a", log)
			ch <- res{p, err}
		}()
		// The update may land before or after the watch starts: the watch
		// starts from the resource version WaitPodCIDRs read.
		if _, err := c.CoreV1().Nodes().Update(ctx, node("a", []string{"10.244.3.0/24", "fd00:10:244:3::/64"}, "192.0.2.1"), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		r := <-ch
		if r.err != nil || !slices.Equal(r.p, want) {
			t.Errorf("WaitPodCIDRs = %v, %v; want %v", r.p, r.err, want)
		}
	})
	t.Run("never", func(t *testing.T) {
		c := fake.NewClientset()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if got, err := WaitPodCIDRs(ctx, c, "a", log); err == nil {
			t.Errorf("WaitPodCIDRs with no node and an ended context = %v, want an error", got)
		}
	})
}
