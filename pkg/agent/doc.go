// Package agent is the shm-cni node agent: it runs the userspace router
// (pkg/router), allocates pod addresses (pkg/ipam), attaches the pod links
// the CNI binary hands it over the agent protocol (pkg/agentapi), serves
// each sandbox link's queue pair to its sandbox, and exposes metrics and
// health over HTTP.
//
// # Use
//
//	cfg := agent.DefaultConfig()
//	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}
//	a, err := agent.New(cfg, log) // in the host network namespace
//	err = a.Run(ctx)              // until ctx is cancelled
//
// New records the calling thread's network namespace as the host namespace
// (the router's uplink TUN and nftables table live there); Run may be called
// from any goroutine, once. Run starts the router, opens the IPAM state,
// re-adopts the attachments a previous agent left, then serves the agent
// socket and the HTTP endpoints until ctx is done. It then stops accepting,
// removes every link (keeping the attachments' records and addresses for the
// next agent), closes everything and returns once every goroutine it started
// has ended.
//
// # Attachments
//
// An attachment is one pod link, named by container ID and interface name.
//
//   - tap: a kernel-stack pod. The CNI binary creates a TAP device in the pod
//     netns and sends its fd; the agent drives it (tap.New) as a router
//     link at once.
//   - veth: a kernel-stack pod the host's kernel routes. The CNI binary
//     creates a veth pair (the host side named linkspec.HostVethName) and
//     sends no descriptor; the agent routes the pod's addresses to the
//     host side, in the host and in the router (through the uplink),
//     installs the pod's bandwidth limit as tbf qdiscs (vethbw_linux.go),
//     and deletes the host side when the attachment goes (veth_linux.go).
//     NetworkPolicy is the router's: the host queues it the first packet
//     of each connection policy must judge (router.Router.HostPolicy);
//     refused with a Kubernetes client where the host cannot.
//   - shm: a sandbox. The CNI binary sends a queue pair; the agent answers
//     with a per-link socket (<sandbox-dir>/<containerID>-<ifName>.sock,
//     mode 0600). The sandbox dials it (shm.Dial), gets the link config
//     and a queue pair, and the agent attaches the link while that
//     connection lives. When the sandbox goes away the link is removed and
//     the next connection gets a fresh queue pair. One sandbox at a time.
//
// The attachment holds its link as a podLink (link.go), implemented by
// tapLink (tap_linux.go), vethLink (veth_linux.go) and sandboxLink
// (sandbox.go); kindOf is the one
// place that chooses between them. A new link kind is a new linkKind.
//
// Every pod address is a /32 or /128 behind the link-local gateway
// (169.254.1.1, fe80::1), which answers with GatewayMAC on every link. The
// addresses come from the request (a delegated IPAM plugin) or from the
// agent's IPAM, which only then releases them on detach.
//
// Each attachment is recorded in <state-dir>/attachments/<containerID>:
// <ifName>.json, written atomically before the attach is answered. On start
// the agent re-adopts them: a tap link's persistent device is re-opened in
// the recorded netns, a veth link's routes are put back, a shm link gets a
// fresh socket and pair. Attachments
// whose netns or device is gone are released (addresses and record).
//
// # NetworkPolicy
//
// With a Kubernetes client (WithKubeClient) Run feeds the router's
// NetworkPolicy (package policy) from the cluster: a kube.PolicySyncer
// watches NetworkPolicies, Pods and Namespaces and the Node, takes this
// node's pods' addresses from the attachments (attachmentsChanged tells it
// when they change) and installs a new snapshot after every change.
// Without a client, or until its informers synced, nothing is enforced.
//
// # HTTP
//
// /metrics (Prometheus: per-link packets, bytes, drops and protocol
// violations, the attachment count, attach latency, the packets policy
// denied per pod and direction and per policy and direction, the
// tracker's refusals), /healthz (the process serves), /readyz (the router
// runs and the agent socket serves), /attachments (JSON list, for
// operators) and /policy (JSON: the policies selecting each local pod and
// its counters, and those policies' counters; ?namespace= and &pod=
// narrow it). At debug level the router logs why each packet policy
// denies was denied (policy.Enforcer.LogDenials), rate-limited.
package agent
