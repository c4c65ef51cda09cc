package kube

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// TestReconcilerSync: in a fresh netns, each Sync leaves exactly its routes
// tagged with RouteProtocol in the main table (added, gateways replaced,
// the rest deleted, a stale one from an earlier agent too), keeps going
// past a route the kernel refuses and returns its error, and never touches
// a route of another protocol unless it routes a wanted destination.
func TestReconcilerSync(t *testing.T) {
	h := newHostNS(t)
	// A stale route of an earlier agent and an administrator's route.
	h.addRoute(t, "10.98.0.0/24", "192.0.2.51", RouteProtocol)
	h.addRoute(t, "10.99.0.0/24", "192.0.2.50", unix.RTPROT_STATIC)
	r, err := NewReconciler(h.nl, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	static := fmt.Sprintf("10.99.0.0/24=192.0.2.50 proto %s", netlink.RouteProtocol(unix.RTPROT_STATIC))
	ours := func(s string) string { return s + " proto " + RouteProtocol.String() }
	for _, step := range []struct {
		name    string
		want    []Route
		err     string   // a substring of Sync's error, "" for none
		routes  []string // our routes after the sync
		foreign []string // other protocols' gateway routes after it
	}{
		{
			name:    "add both families, stale removed",
			want:    routes("10.244.1.0/24=192.0.2.2", "fd00:10:244:1::/64=2001:db8::2"),
			routes:  []string{"10.244.1.0/24=192.0.2.2", "fd00:10:244:1::/64=2001:db8::2"},
			foreign: []string{static},
		},
		{
			name:    "gateway replaced, route added, route removed",
			want:    routes("10.244.1.0/24=192.0.2.3", "10.244.2.0/24=192.0.2.4"),
			routes:  []string{"10.244.1.0/24=192.0.2.3", "10.244.2.0/24=192.0.2.4"},
			foreign: []string{static},
		},
		{
			name:    "same again changes nothing",
			want:    routes("10.244.2.0/24=192.0.2.4", "10.244.1.0/24=192.0.2.3"),
			routes:  []string{"10.244.1.0/24=192.0.2.3", "10.244.2.0/24=192.0.2.4"},
			foreign: []string{static},
		},
		{
			name:    "unreachable gateway reported, the rest synced",
			want:    routes("10.244.1.0/24=198.51.100.7", "10.244.2.0/24=192.0.2.4"),
			err:     "replace 10.244.1.0/24=198.51.100.7",
			routes:  []string{"10.244.2.0/24=192.0.2.4"},
			foreign: []string{static},
		},
		{
			name:   "a wanted destination routed by another protocol is taken over",
			want:   routes("10.99.0.0/24=192.0.2.5"),
			routes: []string{"10.99.0.0/24=192.0.2.5"},
		},
		{
			name: "nothing wanted",
		},
	} {
		t.Run(step.name, func(t *testing.T) {
			err := r.Sync(step.want)
			switch {
			case step.err == "" && err != nil:
				t.Errorf("Sync: %v", err)
			case step.err != "" && (err == nil || !strings.Contains(err.Error(), step.err)):
				t.Errorf("Sync error %v, want one containing %q", err, step.err)
			}
			var wantOurs, wantForeign []string
			for _, s := range step.routes {
				wantOurs = append(wantOurs, ours(s))
			}
			wantForeign = step.foreign
			var gotOurs, gotForeign []string
			for _, s := range h.gatewayRoutes(t) {
				if strings.HasSuffix(s, " proto "+RouteProtocol.String()) {
					gotOurs = append(gotOurs, s)
				} else {
					gotForeign = append(gotForeign, s)
				}
			}
			if !slices.Equal(gotOurs, wantOurs) {
				t.Errorf("our routes %q, want %q", gotOurs, wantOurs)
			}
			if !slices.Equal(gotForeign, wantForeign) {
				t.Errorf("other routes %q, want %q", gotForeign, wantForeign)
			}
			got, err := r.Routes()
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(routes(step.routes...)) {
				t.Errorf("Routes() = %v, want %v", got, step.routes)
			}
		})
	}
}
