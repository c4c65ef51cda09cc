package shm

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/pkg/queue"
)

// newLinkPair makes a queue pair and both its endpoints in this process.
func newLinkPair(t testing.TB, mtu uint32, sizes queue.Sizes) (*Server, *Client) {
	t.Helper()
	p, err := queue.NewPair(sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close() // the endpoints keep what they need
	srv, err := NewServer(Options{Pair: p, MTU: mtu, PeerFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := NewClient(Options{Pair: p, MTU: mtu, BufferSize: sizes.BufferSize, PeerFD: -1})
	if err != nil {
		t.Fatal(err)
	}
	return srv, cli
}

// TestTCPInProcess carries verified TCP both ways between two stacks over
// a server and a client endpoint in one process.
func TestTCPInProcess(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mtu   uint32
		sizes queue.Sizes
	}{
		{"mtu1500", 1500, queue.DefaultSizes()},
		{"mtu1500big", 1500, queue.Sizes{DataSize: 4 << 20, PipeSize: 256 << 10, BufferSize: 2048}},
		{"mtu65000", 65000, queue.Sizes{DataSize: 4 << 20, PipeSize: 256 << 10, BufferSize: 2048}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, cli := newLinkPair(t, tc.mtu, tc.sizes)
			ss, err := hostStack(srv, serverAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer closeStack(ss, srv)
			cs, err := hostStack(cli, clientAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer closeStack(cs, cli)
			ln, err := listenStack(cs, clientAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			n := scaled(64 << 20)
			errc := make(chan error, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					errc <- err
					return
				}
				defer c.Close()
				errc <- exchange(c, n, 2, 1)
			}()
			ctx, cancel := context.WithTimeout(context.Background(), transferTimeout)
			defer cancel()
			c, err := dialStack(ctx, ss, clientAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := exchange(c, n, 1, 2); err != nil {
				t.Fatalf("server side: %v", err)
			}
			if err := <-errc; err != nil {
				t.Fatalf("client side: %v", err)
			}
			t.Logf("server %+v", srv.Stats().Snapshot())
			t.Logf("client %+v", cli.Stats().Snapshot())
			if v := srv.Stats().Violations.Load() + cli.Stats().Violations.Load(); v != 0 {
				t.Errorf("%d violations on a well-behaved link", v)
			}
		})
	}
}

// TestCloseWaitReleases shows that Close then Wait returns and releases the
// endpoint, attached or not (gVisor's server never returns from Wait).
func TestCloseWaitReleases(t *testing.T) {
	for _, attach := range []bool{false, true} {
		srv, cli := newLinkPair(t, 1500, queue.DefaultSizes())
		if attach {
			srv.Attach(discard{})
			cli.Attach(discard{})
		}
		done := make(chan struct{})
		go func() {
			srv.Close()
			srv.Wait()
			cli.Close()
			cli.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(time.Minute): // a hang guard, not a timing
			t.Fatalf("attach=%v: Close+Wait did not return", attach)
		}
	}
}

// TestPeerClosedStops shows that closing the peer socket stops the link
// and calls OnClosed once with ErrPeerClosed.
func TestPeerClosedStops(t *testing.T) {
	p, err := queue.NewPair(queue.DefaultSizes())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	a, b := socketPair(t)
	var calls atomic.Int32
	reason := make(chan error, 2)
	srv, err := NewServer(Options{Pair: p, MTU: 1500, PeerFD: a, OnClosed: func(err error) {
		calls.Add(1)
		reason <- err
	}})
	if err != nil {
		t.Fatal(err)
	}
	closeFD(a)
	srv.Attach(discard{})
	closeFD(b) // the peer dies
	select {
	case err := <-reason:
		if !errors.Is(err, ErrPeerClosed) {
			t.Errorf("OnClosed(%v), want ErrPeerClosed", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("OnClosed not called after the peer closed")
	}
	srv.Wait()
	srv.Close()
	if n := calls.Load(); n != 1 {
		t.Errorf("OnClosed called %d times, want 1", n)
	}
}

// TestCyclesLeakNothing runs 1000 create/attach/close cycles and counts
// goroutines, threads, descriptors and mappings before and after.
func TestCyclesLeakNothing(t *testing.T) {
	cycle := func() {
		p, err := queue.NewPair(queue.DefaultSizes())
		if err != nil {
			t.Fatal(err)
		}
		a, b := socketPair(t)
		srv, err := NewServer(Options{Pair: p, MTU: 1500, PeerFD: a})
		if err != nil {
			t.Fatal(err)
		}
		cli, err := NewClient(Options{Pair: p, MTU: 1500, PeerFD: b})
		if err != nil {
			t.Fatal(err)
		}
		p.Close()
		closeFD(a)
		closeFD(b)
		srv.Attach(discard{})
		cli.Attach(discard{})
		srv.Close()
		cli.Close()
		srv.Wait()
		cli.Wait()
	}
	cycle() // warm up lazily created runtime state
	before := snapshotResources(t)
	for range 1000 {
		cycle()
	}
	after := waitResources(t, before)
	if after.goroutines > before.goroutines || after.fds > before.fds || after.maps > before.maps || after.threads > before.threads+2 {
		t.Errorf("after 1000 cycles: %+v, before: %+v", after, before)
	}
}

// discard is a dispatcher that drops every packet.
type discard struct{}

func (discard) DeliverNetworkPacket(tcpipNetworkProtocolNumber, *stackPacketBuffer) {}
func (discard) DeliverLinkPacket(tcpipNetworkProtocolNumber, *stackPacketBuffer)    {}

// scaled shrinks a transfer under the race detector, which slows the
// netstack tenfold; full sizes run in the plain test run.
func scaled(n int64) int64 {
	if raceEnabled {
		return n / 16
	}
	return n
}
