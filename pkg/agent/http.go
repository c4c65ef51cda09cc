package agent

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sort"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/policy"
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
	// Bandwidth is the pod's bandwidth limit (bits per second and bits),
	// absent when it has none; Router counts what it dropped.
	Bandwidth *linkspec.Bandwidth `json:"bandwidth,omitempty"`
	// Up is set while the link is attached to the router.
	Up bool `json:"up"`
	// Router and Endpoint are the link's counters while it is up. A veth
	// link has Router only, from its host side (Rx what the pod sent, Tx
	// what it was sent; no fast path, no filter: the host's kernel
	// forwards and filters) and its bandwidth limit's tbf qdiscs.
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
			Addrs: r.Addrs, PodMAC: r.PodMAC, MTU: r.MTU, Bandwidth: r.Bandwidth,
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

// PolicyStatus is the NetworkPolicy the router enforces, as /policy
// shows it.
type PolicyStatus struct {
	// Enforced is set once a snapshot is installed (the agent has a
	// Kubernetes client and its informers synced).
	Enforced bool `json:"enforced"`
	// Generation is the snapshot's (see policy.Snapshot.Generation).
	Generation uint64 `json:"generation,omitempty"`
	// Problems are what the compiler skipped and why.
	Problems []string `json:"problems,omitempty"`
	// Pods are the local pods, sorted by namespace and name.
	Pods []PodPolicy `json:"pods"`
	// Policies are the NetworkPolicies isolating a local pod, sorted by
	// namespace and name.
	Policies []NetworkPolicyCounts `json:"policies"`
}

// NetworkPolicyCounts are one NetworkPolicy's counters on this node.
type NetworkPolicyCounts struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// DeniedIngress and DeniedEgress count the packets denied to and
	// from the local pods the policy selects for ingress and egress (a
	// packet counts against every policy isolating its pod); nil for a
	// direction in which it selects no local pod.
	DeniedIngress *uint64 `json:"deniedIngress,omitempty"`
	DeniedEgress  *uint64 `json:"deniedEgress,omitempty"`
}

// PodPolicy is one local pod's policies and counters.
type PodPolicy struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	// Ingress and Egress name the policies selecting the pod in each
	// direction; nil when none does (the pod is not isolated in it).
	Ingress []string `json:"ingress"`
	Egress  []string `json:"egress"`
	// DeniedIngress and DeniedEgress count the packets denied.
	DeniedIngress uint64 `json:"deniedIngress"`
	DeniedEgress  uint64 `json:"deniedEgress"`
	// Refused counts connections the tracker had no room for.
	Refused uint64 `json:"refused"`
	// Conns is how many tracked connections are charged to the pod.
	Conns int `json:"conns"`
}

// Policy returns the installed NetworkPolicy snapshot's view of the local
// pods and the policies isolating them: of every pod, or of the pods of
// namespace (and named pod) when they are not empty, and the policies
// selecting those.
func (a *Agent) Policy(namespace, pod string) PolicyStatus {
	snap := a.router.Policy()
	st := PolicyStatus{Pods: []PodPolicy{}, Policies: []NetworkPolicyCounts{}}
	if snap == nil {
		return st
	}
	st.Enforced, st.Generation, st.Problems = true, snap.Generation(), snap.Problems()
	counts := map[string]policy.PodCounts{}
	for _, c := range a.router.PolicyCounts() {
		counts[c.Namespace+"/"+c.Pod] = c
	}
	for _, p := range snap.Pods() {
		if (namespace != "" && p.Namespace != namespace) || (pod != "" && p.Name != pod) {
			continue
		}
		c := counts[p.Namespace+"/"+p.Name]
		st.Pods = append(st.Pods, PodPolicy{
			Namespace: p.Namespace, Pod: p.Name,
			Ingress: p.Policies(policy.Ingress), Egress: p.Policies(policy.Egress),
			DeniedIngress: c.Denied[policy.Ingress], DeniedEgress: c.Denied[policy.Egress],
			Refused: c.Refused, Conns: c.Conns,
		})
	}
	shown := map[string]bool{}
	for _, p := range st.Pods {
		for _, n := range append(p.Ingress, p.Egress...) {
			shown[n] = true
		}
	}
	for _, c := range a.router.NetworkPolicyCounts() {
		if !shown[c.Namespace+"/"+c.Policy] {
			continue
		}
		pc := NetworkPolicyCounts{Namespace: c.Namespace, Name: c.Policy}
		if c.Isolates[policy.Ingress] {
			pc.DeniedIngress = &c.Denied[policy.Ingress]
		}
		if c.Isolates[policy.Egress] {
			pc.DeniedEgress = &c.Denied[policy.Egress]
		}
		st.Policies = append(st.Policies, pc)
	}
	return st
}

// httpHandler serves /metrics, /healthz, /readyz, /attachments and
// /policy (?namespace=&pod= narrow it).
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
	mux.HandleFunc("GET /policy", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(a.Policy(r.URL.Query().Get("namespace"), r.URL.Query().Get("pod")))
	})
	return mux
}
