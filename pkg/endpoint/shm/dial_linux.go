package shm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/shm-cni/shm-cni/internal/unixmsg"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// DialOptions configure Dial.
type DialOptions struct {
	// OnClosed is the client endpoint's Options.OnClosed: called once
	// when the agent went away (ErrPeerClosed) or broke the protocol. A
	// sandbox typically dials again then.
	OnClosed func(error)
	// Poll is the client endpoint's Options.Poll.
	Poll time.Duration
	// Logger receives the endpoint's rare events; nil discards them.
	Logger *slog.Logger
	// NoTxGSO keeps the client to plain frames where the agent offers TCP
	// segmentation offload (LinkConfig.TxGSO): for comparisons.
	NoTxGSO bool
	// NoRxGSO keeps the client to full checksums where the agent offers
	// checksum offload (LinkConfig.RxGSO): for comparisons.
	NoRxGSO bool
}

// Dial connects to the agent's per-link socket at socketPath (the
// socketPath of the CNI result), receives the link config and a fresh
// queue pair, and returns the client endpoint, ready to be attached to the
// sandbox's netstack (stack.CreateNIC), with the config to apply to that
// netstack (see LinkConfig.Configure). ctx bounds the connect and the
// exchange, not the link.
//
// The connection stays open inside the endpoint: it tells the agent that
// the sandbox lives, and the endpoint that the agent lives. Closing the
// endpoint (Close, then Wait) hangs up, and the agent then prepares a new
// queue pair for the next Dial. The agent serves one sandbox per link at a
// time: Dial fails with an error wrapping ErrDialRefused while another
// connection holds the link.
func Dial(ctx context.Context, socketPath string, opts DialOptions) (*Client, LinkConfig, error) {
	conn, pair, cfg, err := DialPair(ctx, socketPath)
	if err != nil {
		return nil, LinkConfig{}, err
	}
	defer conn.Close()              // the endpoint keeps its own duplicate
	defer pair.Close()              // NewClient duplicates what it keeps
	mac, _ := net.ParseMAC(cfg.MAC) // checked by ParseLinkConfig
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	var client *Client
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		client, cerr = NewClient(Options{
			Pair:        pair,
			MTU:         cfg.MTU,
			BufferSize:  cfg.BufferSize,
			LinkAddress: tcpip.LinkAddress(mac),
			PeerFD:      int(fd),
			TxGSO:       cfg.TxGSO && !opts.NoTxGSO,
			RxGSO:       cfg.RxGSO && !opts.NoRxGSO,
			OnClosed:    opts.OnClosed,
			Poll:        opts.Poll,
			Logger:      opts.Logger,
		})
	}); err != nil {
		return nil, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	if cerr != nil {
		return nil, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, cerr)
	}
	return client, cfg, nil
}

// DialPair is Dial for sandboxes that bring their own endpoint (gVisor's
// sharedmem.New, say): it returns the open connection, the queue pair and
// the link config; the caller owns and must close the connection and the
// pair. The link lives as long as the connection: the agent takes the
// connection's end as the sandbox's death.
func DialPair(ctx context.Context, socketPath string) (*net.UnixConn, queue.Pair, LinkConfig, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socketPath)
	if err != nil {
		return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	conn := c.(*net.UnixConn)
	success := false
	defer func() {
		if !success {
			conn.Close()
		}
	}()
	if dl, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(dl); err != nil {
			return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
		}
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	buf := make([]byte, MaxLinkConfigSize)
	n, fds, err := recvLinkRecord(conn, buf)
	if err != nil {
		if ctx.Err() != nil {
			err = errors.Join(err, context.Cause(ctx))
		}
		return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	cfg, err := ParseLinkConfig(buf[:n])
	if err != nil {
		unixmsg.Close(fds)
		return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	pair, err := queue.PairFrom(fds)
	if err != nil {
		unixmsg.Close(fds)
		return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	if !stop() {
		// ctx ended after the exchange: the deadline may be in the past.
		if err := context.Cause(ctx); err != nil {
			pair.Close()
			return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
		}
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		pair.Close()
		return nil, queue.Pair{}, LinkConfig{}, fmt.Errorf("dial %s: %w", socketPath, err)
	}
	success = true
	return conn, pair, cfg, nil
}

// recvLinkRecord reads the one record of the dial protocol: its length and
// its descriptors (close-on-exec). It fails, leaving no descriptor open,
// when the record or its descriptors were truncated or when the number of
// descriptors is neither 0 (a refusal) nor queue.FDsPerPair.
func recvLinkRecord(conn *net.UnixConn, buf []byte) (int, []int, error) {
	// Room for one more descriptor than expected, to tell "too many".
	m, err := unixmsg.Recv(conn, buf, queue.FDsPerPair+1)
	if err != nil {
		return 0, nil, fmt.Errorf("receive link config: %w", err)
	}
	n, fds := m.N, m.FDs
	switch {
	case n == 0:
		err = errors.New("agent closed the connection without a link config")
	case m.Truncated:
		err = fmt.Errorf("link config larger than %d bytes", len(buf))
	case m.FDsTruncated:
		err = errors.New("descriptors truncated (too many sent, or no free descriptor here)")
	case len(fds) != 0 && len(fds) != queue.FDsPerPair:
		err = fmt.Errorf("got %d descriptors, want %d", len(fds), queue.FDsPerPair)
	}
	if err != nil {
		unixmsg.Close(fds)
		return 0, nil, fmt.Errorf("receive link config: %w", err)
	}
	return n, fds, nil
}

// SendLinkConfig is the agent's half of Dial: it sends cfg (Version set)
// with the descriptors of pair on conn, in one record. The caller keeps
// pair's descriptors (the kernel passes duplicates) and must not write
// anything else on conn.
func SendLinkConfig(conn *net.UnixConn, cfg LinkConfig, pair queue.Pair) error {
	cfg.Version = LinkConfigVersion
	cfg.Error = ""
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("send link config: %w", err)
	}
	return sendLinkRecord(conn, &cfg, unix.UnixRights(pair.FDs()...))
}

// SendDialError refuses a Dial: it sends a link config carrying only reason
// and no descriptors. The caller then closes conn.
func SendDialError(conn *net.UnixConn, reason string) error {
	if reason == "" {
		reason = "refused"
	}
	return sendLinkRecord(conn, &LinkConfig{Version: LinkConfigVersion, Error: reason}, nil)
}

func sendLinkRecord(conn *net.UnixConn, cfg *LinkConfig, oob []byte) error {
	b, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("send link config: %w", err)
	}
	if len(b) > MaxLinkConfigSize {
		return fmt.Errorf("send link config: %d bytes, more than %d", len(b), MaxLinkConfigSize)
	}
	n, oobn, err := conn.WriteMsgUnix(b, oob, nil)
	if err == nil && (n != len(b) || oobn != len(oob)) {
		err = fmt.Errorf("short write: %d of %d bytes, %d of %d control bytes", n, len(b), oobn, len(oob))
	}
	if err != nil {
		return fmt.Errorf("send link config: %w", err)
	}
	return nil
}
