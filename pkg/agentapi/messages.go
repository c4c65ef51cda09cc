package agentapi

import "github.com/shm-cni/shm-cni/pkg/linkspec"

// Version is the protocol version this package speaks. Every Request and
// Response carries it; a peer speaking another version is refused with
// CodeVersionMismatch.
const Version = 1

// DefaultSocketPath is where the agent listens unless configured otherwise.
const DefaultSocketPath = "/run/shm-cni/agent.sock"

const (
	// MaxMessageSize is the largest request or response record, in bytes
	// (64 KiB). Larger requests are refused by Call before sending and by
	// the server on receipt.
	MaxMessageSize = 64 << 10
	// MaxFDs is the most file descriptors one request may carry.
	MaxFDs = 16
)

// Operations, the values of Request.Op.
const (
	OpAttach = "attach" // create an attachment (CNI ADD); body Request.Attach
	OpDetach = "detach" // remove an attachment (CNI DEL); body Request.Detach
	OpCheck  = "check"  // verify an attachment (CNI CHECK); body Request.Check
	OpStatus = "status" // is the agent ready (CNI STATUS); no body
	OpGC     = "gc"     // release everything not listed (CNI GC); body Request.GC
)

// Link kinds, the values of AttachRequest.Kind.
const (
	// KindShm is a shared-memory queue pair to a sandbox's userspace stack.
	// The request carries ShmFDs descriptors.
	KindShm = "shm"
	// KindTap is a TAP device in the pod netns for a kernel-stack pod. The
	// request carries TapFDs descriptors.
	KindTap = "tap"
	// KindVeth is a veth pair for a kernel-stack pod: its host side
	// (linkspec.HostVethName) in the host netns, where the kernel routes
	// the pod's traffic; the agent routes to it through the uplink. The
	// request carries no descriptor.
	KindVeth = "veth"
)

const (
	// ShmFDs is the FD count of a shm attach: two queues (TX, then RX) of
	// five FDs each, in the order Data, Event, TxPipe, RxPipe, SharedData
	// (2 × 5 = 10).
	ShmFDs = 10
	// TapFDs is the FD count of a tap attach: the TAP device's fd.
	TapFDs = 1
)

// Request is the one message the CNI binary sends per connection. Exactly
// the body matching Op is set (none for OpStatus).
type Request struct {
	Version int            `json:"version"`
	Op      string         `json:"op"`
	Attach  *AttachRequest `json:"attach,omitempty"`
	Detach  *DetachRequest `json:"detach,omitempty"`
	Check   *CheckRequest  `json:"check,omitempty"`
	GC      *GCRequest     `json:"gc,omitempty"`
}

// AttachRequest asks the agent to attach a pod link whose resources travel
// as FDs with the request: for KindShm the ShmFDs queue FDs (TX queue, then
// RX queue, each Data, Event, TxPipe, RxPipe, SharedData), for KindTap the
// TAP fd.
type AttachRequest struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	// Netns is the path of the pod's network namespace.
	Netns string `json:"netns"`
	// Network is the conflist's name.
	Network string `json:"network"`
	// Kind is KindShm or KindTap.
	Kind string `json:"kind"`
	// MTU of the link; 0 lets the agent choose.
	MTU int `json:"mtu,omitempty"`
	// Queue gives the queue sizes of a shm link (required for KindShm,
	// absent for KindTap). The queue package checks the values.
	Queue *QueueSizes `json:"queue,omitempty"`
	// IPs are CIDRs ("10.1.2.3/24") the CNI binary obtained from a
	// delegated IPAM plugin; empty means the agent allocates.
	IPs []string `json:"ips,omitempty"`
	// PodNamespace and PodName identify the pod, for logs and policy.
	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	// MAC is the pod-side MAC of a TAP link, so the agent can pin a static
	// neighbor entry. Optional.
	MAC string `json:"mac,omitempty"`
	// Bandwidth is the pod's bandwidth limit (the CNI bandwidth
	// capability), which the agent enforces on the link; nil or zero
	// limits nothing.
	Bandwidth *linkspec.Bandwidth `json:"bandwidth,omitempty"`
}

// QueueSizes are the sizes of a shm link's queues, in bytes.
type QueueSizes struct {
	DataSize   uint64 `json:"dataSize"`
	PipeSize   uint64 `json:"pipeSize"`
	BufferSize uint32 `json:"bufferSize"`
}

// DetachRequest asks the agent to remove an attachment. Detaching an
// attachment that does not exist succeeds (CNI DEL is idempotent).
type DetachRequest struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

// CheckRequest asks the agent whether an attachment exists and holds IPs
// (CIDR strings; empty skips the address check) and, when Bandwidth is
// set, enforces exactly that limit (zero: none).
type CheckRequest struct {
	ContainerID string              `json:"containerID"`
	IfName      string              `json:"ifName"`
	IPs         []string            `json:"ips,omitempty"`
	Bandwidth   *linkspec.Bandwidth `json:"bandwidth,omitempty"`
}

// GCRequest asks the agent to release every attachment (and its addresses)
// not listed in Valid. An empty Valid releases everything.
type GCRequest struct {
	Valid []Attachment `json:"valid"`
}

// Attachment names one pod link.
type Attachment = linkspec.Key

// Key returns the attachment r is about.
func (r *AttachRequest) Key() Attachment {
	return Attachment{ContainerID: r.ContainerID, IfName: r.IfName}
}

// Key returns the attachment r is about.
func (r *DetachRequest) Key() Attachment {
	return Attachment{ContainerID: r.ContainerID, IfName: r.IfName}
}

// Key returns the attachment r is about.
func (r *CheckRequest) Key() Attachment {
	return Attachment{ContainerID: r.ContainerID, IfName: r.IfName}
}

// Response is the agent's one answer. Error is set on failure; otherwise the
// body matching the request's Op is set (Attach, Status, GC; none for
// detach and check).
type Response struct {
	Version int             `json:"version"`
	Error   *Error          `json:"error,omitempty"`
	Attach  *AttachResponse `json:"attach,omitempty"`
	Status  *StatusResponse `json:"status,omitempty"`
	GC      *GCResponse     `json:"gc,omitempty"`
}

// AttachResponse is the configuration of a new attachment, for the CNI
// binary to apply in the pod netns and report to the runtime.
type AttachResponse struct {
	IPs    []IPConfig `json:"ips"`
	Routes []Route    `json:"routes,omitempty"`
	MTU    int        `json:"mtu"`
	// MAC is the pod-side MAC of a shm link, or the agent-side (gateway)
	// MAC of a tap link.
	MAC string `json:"mac,omitempty"`
	// GatewayMAC is the MAC the agent answers with for the gateway.
	GatewayMAC string `json:"gatewayMAC,omitempty"`
	// SocketPath is the per-attachment unix socket a sandbox dials to get
	// its queue FDs and link config (shm only).
	SocketPath string `json:"socketPath,omitempty"`
}

// IPConfig is one address of the pod link.
type IPConfig struct {
	Address string `json:"address"` // CIDR
	Gateway string `json:"gateway,omitempty"`
}

// Route is one route in the pod netns.
type Route struct {
	Dst string `json:"dst"` // CIDR
	GW  string `json:"gw,omitempty"`
	MTU int    `json:"mtu,omitempty"`
}

// StatusResponse says whether the agent can take attachments.
type StatusResponse struct {
	Ready       bool   `json:"ready"`
	Reason      string `json:"reason,omitempty"`
	Attachments int    `json:"attachments"`
}

// GCResponse lists what a GC released.
type GCResponse struct {
	Released []Attachment `json:"released"`
}
