package main

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
	"github.com/shm-cni/shm-cni/test/e2e/pattern"
)

// rttClient is the netstack client of the sandbox round trips: the sandbox
// program in its rtt mode, connected to an echo sandbox. It is a process of
// its own, built like the sandboxes (on the runsc series' gVisor), so that
// both ends of a sandbox round trip run the same netstack.
type rttClient struct {
	pid  int
	send func(line string) error                                  // a line to its stdin
	next func(ctx context.Context, prefix string) (string, error) // its next stdout line with prefix
	// end ends its stdin and waits for it to exit.
	end func(ctx context.Context) error
}

// round makes count timed round trips (after the warm-up) and returns
// their times.
func (c *rttClient) round(ctx context.Context, count int) ([]time.Duration, error) {
	if err := c.send(strconv.Itoa(count)); err != nil {
		return nil, err
	}
	l, err := c.next(ctx, pattern.RoundTripPrefix)
	if err != nil {
		return nil, fmt.Errorf("netstack client: %w", err)
	}
	return pattern.ParseRoundTrips(l)
}

// close ends the client, bounded by a minute.
func (c *rttClient) close(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := c.end(ctx); err != nil {
		return fmt.Errorf("netstack client: %w", err)
	}
	return nil
}

// startShmClient starts the netstack client on the shm pod p, connected to
// the echo server at to.
func startShmClient(ctx context.Context, n *node.Node, p *node.Pod, to netip.AddrPort) (*rttClient, error) {
	s, err := n.StartSandbox(p, "--mode", "rtt", "--to", to.String())
	if err != nil {
		return nil, err
	}
	c := &rttClient{
		pid:  s.PID(),
		send: s.WriteLine,
		next: s.WaitLine,
		end: func(ctx context.Context) error {
			s.CloseInput()
			return s.Wait(ctx)
		},
	}
	if _, err := s.WaitLine(ctx, "ready"); err != nil {
		s.Stop()
		return nil, err
	}
	return c, nil
}

// withShmClient runs f with a netstack client on the shm pod p, connected
// to the echo server at to, and ends the client after.
func withShmClient(ctx context.Context, n *node.Node, p *node.Pod, to netip.AddrPort, f func(*rttClient) error) (err error) {
	c, err := startShmClient(ctx, n, p, to)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := c.close(ctx); err == nil {
			err = cerr
		}
	}()
	return f(c)
}

// netstackRTT measures count round trips from a netstack client on the shm
// pod p to the echo server at to: a sandbox-to-sandbox latency.
func netstackRTT(ctx context.Context, n *node.Node, p *node.Pod, to netip.AddrPort, count int) (ds []time.Duration, err error) {
	err = withShmClient(ctx, n, p, to, func(c *rttClient) error {
		var rerr error
		ds, rerr = c.round(ctx, count)
		return rerr
	})
	return ds, err
}
