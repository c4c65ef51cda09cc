package agent

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sort"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// LinkStatus describes one attachment and its counters, as /attachments
// lists them.
type LinkStatus struct {
	ContainerID  string       `json:"containerID"`
	IfName       string       `json:"ifName"`
	Kind         string       `json:"kind"`
	PodNamespace string       `json:"podNamespace,omitempty"`
	PodName      string       `json:"podName,omitempty"`
	Netns        string       `json:"netns"`
	Addrs        []netip.Addr `json:"addrs"`
	PodMAC       string       `json:"podMAC"`
	MTU          int          `json:"mtu"`
	// SocketPath is a shm link's sandbox socket.
	SocketPath string `json:"socketPath,omitempty"`
	// Up is set while the link is attached to the router.
	Up bool `json:"up"`
	// Router and Endpoint are the link's counters while it is up.
	Router   *router.LinkStats       `json:"router,omitempty"`
	Endpoint *endpoint.StatsSnapshot `json:"endpoint,omitempty"`
}

// Attachments returns every attachment with its counters, ordered by
// container ID and interface name.
func (a *Agent) Attachments() []LinkStatus { return a.linkStatus() }

func (a *Agent) linkStatus() []LinkStatus {
	a.mu.Lock()
	atts := make([]*attachment, 0, len(a.attachments))
	for _, att := range a.attachments {
		atts = append(atts, att)
	}
	a.mu.Unlock()
	out := make([]LinkStatus, 0, len(atts))
	for _, att := range atts {
		r := att.rec
		st := LinkStatus{
			ContainerID: r.ContainerID, IfName: r.IfName, Kind: r.Kind,
			PodNamespace: r.PodNS, PodName: r.PodName, Netns: r.Netns,
			Addrs: r.Addrs, PodMAC: r.PodMAC, MTU: r.MTU,
		}
		att.link.status(&st)
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].ContainerID != out[j].ContainerID {
			return out[i].ContainerID < out[j].ContainerID
		}
		return out[i].IfName < out[j].IfName
	})
	return out
}

// httpHandler serves /metrics, /healthz, /readyz and /attachments.
func (a *Agent) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.isReady() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	if a.cfg.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("GET /attachments", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(a.linkStatus())
	})
	return mux
}
