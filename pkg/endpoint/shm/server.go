package shm

import (
	"fmt"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// Server is the agent's side of a sandbox's queue pair: a gVisor link
// endpoint that receives the frames the sandbox puts on the TX queue and
// fills the buffers it posts on the RX queue. Everything the sandbox writes
// into shared memory is checked; a sandbox that breaks the protocol is cut
// off and counted in Stats().Violations. A full RX queue drops and counts.
type Server struct {
	*queueEndpoint
}

var _ stack.LinkEndpoint = (*Server)(nil)

// NewServer maps the queue pair of opts and returns the server endpoint. The
// regions must be memfds sealed against shrinking (queue.NewPair makes
// them so). It starts working when attached to a stack.
func NewServer(opts Options) (*Server, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("shared-memory server: %w", err)
	}
	strict := queue.MapOptions{RequireSeals: true}
	maxFrame := opts.MTU + hdrSize(&opts)
	rx, err := queue.NewReceiver(opts.Pair.TX, maxFrame, strict)
	if err != nil {
		return nil, fmt.Errorf("shared-memory server: %w", err)
	}
	tx, err := queue.NewFiller(opts.Pair.RX, strict)
	if err != nil {
		rx.Close()
		return nil, fmt.Errorf("shared-memory server: %w", err)
	}
	l, err := newQueueEndpoint(&opts, rx, tx, opts.Pair.TX.Event, opts.Pair.RX.Event)
	if err != nil {
		return nil, fmt.Errorf("shared-memory server: %w", err)
	}
	l.podWait = max(opts.TxWait, 0)
	return &Server{l}, nil
}

// WritePacketsWaiting is WritePackets waiting up to Options.TxWait for room
// in the client's receive ring, as WriteFrame does. The router's fast path
// writes a pod's packets this way: the wait holds up the pod's own link
// (its receive loop), and the pod's TCP sees back-pressure where a full
// ring would drop (four streams into one sandbox lost a thousand segments
// a second to it). The router's slow path, which serves every link, writes
// with WritePackets and never waits.
func (s *Server) WritePacketsWaiting(pkts stack.PacketBufferList) (int, tcpip.Error) {
	return s.writePackets(pkts, s.podWait)
}

// DefaultClientTxWait is how long a client's writer waits, in all for one
// batch, for the server to complete frames when its TX queue is full, before
// it drops. A sandbox's own TCP then sees back-pressure instead of loss. It
// is long enough to ride out an agent that is busy with other links on a
// loaded node (2 ms was not: four streams from one sandbox lost frames on
// their own link and their retransmissions with them, and spent half their
// rate in loss recovery and timeouts), and short enough that a stuck agent
// costs a writer little before it drops.
const DefaultClientTxWait = 20 * time.Millisecond

// Client is a sandbox's side of its queue pair: a gVisor link endpoint for
// the sandbox's own netstack. It checks what the server writes too.
type Client struct {
	*queueEndpoint
}

var _ stack.LinkEndpoint = (*Client)(nil)

// NewClient maps the queue pair of opts, posts its receive buffers and
// returns the client endpoint. It starts working when attached to a stack.
func NewClient(opts Options) (*Client, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("shared-memory client: %w", err)
	}
	if opts.BufferSize == 0 {
		opts.BufferSize = queue.DefaultBufferSize
	}
	// gVisor's own server reports frames padded to a whole number of
	// buffers: accept the padding (the IP layer trims it).
	maxFrame := opts.MTU + hdrSize(&opts)
	maxFrame = (maxFrame + opts.BufferSize - 1) / opts.BufferSize * opts.BufferSize
	rx, err := queue.NewPoster(opts.Pair.RX, opts.BufferSize, maxFrame, queue.MapOptions{})
	if err != nil {
		return nil, fmt.Errorf("shared-memory client: %w", err)
	}
	tx, err := queue.NewSender(opts.Pair.TX, opts.BufferSize, queue.MapOptions{})
	if err != nil {
		rx.Close()
		return nil, fmt.Errorf("shared-memory client: %w", err)
	}
	l, err := newQueueEndpoint(&opts, rx, tx, opts.Pair.RX.Event, opts.Pair.TX.Event)
	if err != nil {
		return nil, fmt.Errorf("shared-memory client: %w", err)
	}
	l.txWait = DefaultClientTxWait
	return &Client{l}, nil
}

func hdrSize(o *Options) uint32 {
	return endpoint.FramingOf(len(o.LinkAddress) != 0).HeaderLength()
}
