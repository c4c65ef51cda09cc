package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/containernetworking/plugins/pkg/ns"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// listWatchServer is the part of a Kubernetes API server the agent's
// informers use (list and watch of Nodes, Pods, Namespaces and
// NetworkPolicies, cluster-wide), serving objects the bench sets: so the
// real agent process, with its client-go informers, its policy syncer
// and the real compiler, enforces policies the bench chooses, without an
// API server and etcd on the measured machine. Plain HTTP on the loopback
// of the node's host namespace; no authentication.
//
// A watch with sendInitialEvents (client-go's watch-list) is refused, so
// the informers fall back to list then watch, as against an API server
// without the feature.
type listWatchServer struct {
	srv *http.Server
	ln  net.Listener
	// done is closed when Serve returned.
	done chan struct{}

	mu sync.Mutex
	// rv is the last resource version given.
	// +checklocks:mu
	rv uint64
	// objs are the objects by resource path (e.g. "api/v1/pods") and
	// namespace/name.
	// +checklocks:mu
	objs map[string]map[string]apiObject
	// events are every change by resource path, in order.
	// +checklocks:mu
	events map[string][]watchEvent
	// changed is closed and replaced at every change.
	// +checklocks:mu
	changed chan struct{}
}

// apiObject is an object with its metadata reachable for the server.
type apiObject interface {
	GetNamespace() string
	GetName() string
	SetResourceVersion(string)
}

type watchEvent struct {
	rv  uint64
	typ string // ADDED, MODIFIED, DELETED
	obj json.RawMessage
}

// resources are the paths served, with their list kinds.
var resources = map[string]string{
	"api/v1/nodes":      "NodeList",
	"api/v1/pods":       "PodList",
	"api/v1/namespaces": "NamespaceList",
	"apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicyList",
}

// startListWatchServer serves on an ephemeral port of 127.0.0.1 in
// netns x.
func startListWatchServer(x ns.NetNS) (*listWatchServer, error) {
	s := &listWatchServer{objs: map[string]map[string]apiObject{}, events: map[string][]watchEvent{},
		changed: make(chan struct{}), done: make(chan struct{})}
	for r := range resources {
		s.objs[r] = map[string]apiObject{}
	}
	err := x.Do(func(ns.NetNS) error {
		var err error
		s.ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list/watch server: %w", err)
	}
	s.srv = &http.Server{Handler: s}
	go func() {
		defer close(s.done)
		s.srv.Serve(s.ln)
	}()
	return s, nil
}

// close stops the server and ends its watches.
func (s *listWatchServer) close() {
	s.srv.Close()
	<-s.done
}

// writeKubeconfig writes a kubeconfig for the server to path.
func (s *listWatchServer) writeKubeconfig(path string) error {
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster:
    server: http://%s
contexts:
- name: bench
  context:
    cluster: bench
    user: bench
users:
- name: bench
  user: {}
current-context: bench
`, s.ln.Addr())
	return os.WriteFile(path, []byte(cfg), 0o600)
}

// set makes objs the whole content of resource (created, changed or
// deleted as needed; objects equal to the served ones are left alone).
func (s *listWatchServer) set(resource string, objs []apiObject) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.objs[resource]
	want := map[string]apiObject{}
	for _, o := range objs {
		want[o.GetNamespace()+"/"+o.GetName()] = o
	}
	changed := false
	for k, o := range cur {
		if _, ok := want[k]; !ok {
			if err := s.eventLocked(resource, "DELETED", o); err != nil {
				return err
			}
			delete(cur, k)
			changed = true
		}
	}
	for k, o := range want {
		typ := "ADDED"
		if old, ok := cur[k]; ok {
			if old == o {
				continue
			}
			typ = "MODIFIED"
		}
		if err := s.eventLocked(resource, typ, o); err != nil {
			return err
		}
		cur[k] = o
		changed = true
	}
	if changed {
		close(s.changed)
		s.changed = make(chan struct{})
	}
	return nil
}

// +checklocks:s.mu
func (s *listWatchServer) eventLocked(resource, typ string, o apiObject) error {
	s.rv++
	o.SetResourceVersion(strconv.FormatUint(s.rv, 10))
	raw, err := json.Marshal(o)
	if err != nil {
		return fmt.Errorf("list/watch server: %w", err)
	}
	s.events[resource] = append(s.events[resource], watchEvent{rv: s.rv, typ: typ, obj: raw})
	return nil
}

// ServeHTTP implements http.Handler: GET of a resource's list, or with
// watch=true its changes after resourceVersion.
func (s *listWatchServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := strings.Trim(r.URL.Path, "/")
	kind, ok := resources[path]
	if r.Method != http.MethodGet || !ok {
		apiError(w, http.StatusNotFound, "NotFound", "not served: "+r.Method+" "+r.URL.Path)
		return
	}
	q := r.URL.Query()
	name := ""
	if fs := q.Get("fieldSelector"); fs != "" {
		v, ok := strings.CutPrefix(fs, "metadata.name=")
		if !ok {
			apiError(w, http.StatusBadRequest, "BadRequest", "field selector not served: "+fs)
			return
		}
		name = v
	}
	if q.Get("watch") == "true" || q.Get("watch") == "1" {
		if q.Get("sendInitialEvents") == "true" {
			apiError(w, http.StatusBadRequest, "BadRequest", "sendInitialEvents not served")
			return
		}
		from, _ := strconv.ParseUint(q.Get("resourceVersion"), 10, 64)
		s.watch(r.Context(), w, path, name, from)
		return
	}
	s.mu.Lock()
	items := []json.RawMessage{}
	for _, o := range s.objs[path] {
		if name != "" && o.GetName() != name {
			continue
		}
		raw, err := json.Marshal(o)
		if err != nil {
			s.mu.Unlock()
			apiError(w, http.StatusInternalServerError, "InternalError", err.Error())
			return
		}
		items = append(items, raw)
	}
	rv := s.rv
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"kind": kind, "apiVersion": apiVersion(path),
		"metadata": map[string]string{"resourceVersion": strconv.FormatUint(rv, 10)},
		"items":    items,
	})
}

// watch streams resource's events after resource version from (of the
// object name, when set) until the client goes or the server closes.
func (s *listWatchServer) watch(ctx context.Context, w http.ResponseWriter, resource, name string, from uint64) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	if fl != nil {
		fl.Flush()
	}
	enc := json.NewEncoder(w)
	sent := 0
	for {
		s.mu.Lock()
		evs := s.events[resource][sent:]
		sent = len(s.events[resource])
		changed := s.changed
		s.mu.Unlock()
		for _, ev := range evs {
			if ev.rv <= from {
				continue
			}
			if name != "" {
				var m struct {
					Metadata metav1.ObjectMeta `json:"metadata"`
				}
				if json.Unmarshal(ev.obj, &m) != nil || m.Metadata.Name != name {
					continue
				}
			}
			if enc.Encode(map[string]any{"type": ev.typ, "object": ev.obj}) != nil {
				return
			}
		}
		if fl != nil {
			fl.Flush()
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

func apiVersion(path string) string {
	if strings.HasPrefix(path, "apis/networking.k8s.io/") {
		return "networking.k8s.io/v1"
	}
	return "v1"
}

// apiError writes a metav1.Status, as the API server answers errors.
func apiError(w http.ResponseWriter, code int, reason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(metav1.Status{
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure, Message: msg, Reason: metav1.StatusReason(reason), Code: int32(code),
	})
}
