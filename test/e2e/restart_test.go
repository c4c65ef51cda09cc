package e2e

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// pinger keeps one TCP connection between two kernel pods busy with 8-byte
// request/response exchanges and records when each completed.
type pinger struct {
	conn net.Conn

	mu    sync.Mutex
	times []time.Time // guarded by mu
	err   error       // the first error; guarded by mu

	stop chan struct{}
	done chan struct{}
}

// startPinger connects from client to server's address and starts the
// exchanges; the server side echoes.
func startPinger(t *testing.T, client, server ns.NetNS, to netip.Addr) *pinger {
	t.Helper()
	ln, err := node.ListenIn(server, netip.AddrPortFrom(to, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conn net.Conn
	if err := client.Do(func(ns.NetNS) error {
		conn, err = net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer peer.Close()
		io.Copy(peer, peer)
	}()
	p := &pinger{conn: conn, stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	t.Cleanup(func() { p.halt() })
	return p
}

func (p *pinger) run() {
	defer close(p.done)
	var req, resp [8]byte
	for seq := uint64(0); ; seq++ {
		select {
		case <-p.stop:
			return
		default:
		}
		binary.BigEndian.PutUint64(req[:], seq)
		// TCP retransmits through an outage; the deadline only bounds
		// a connection that is truly dead.
		p.conn.SetDeadline(time.Now().Add(60 * time.Second))
		_, err := p.conn.Write(req[:])
		if err == nil {
			_, err = io.ReadFull(p.conn, resp[:])
		}
		if err == nil && resp != req {
			err = fmt.Errorf("exchange %d: echoed %x, want %x", seq, resp, req)
		}
		p.mu.Lock()
		if err != nil {
			p.err = err
			p.mu.Unlock()
			return
		}
		p.times = append(p.times, time.Now())
		p.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
}

// since returns how many exchanges completed after t, and the first error.
func (p *pinger) since(t time.Time) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for i := len(p.times) - 1; i >= 0 && p.times[i].After(t); i-- {
		n++
	}
	return n, p.err
}

// longestGap returns the longest time between two completed exchanges.
func (p *pinger) longestGap() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var gap time.Duration
	for i := 1; i < len(p.times); i++ {
		gap = max(gap, p.times[i].Sub(p.times[i-1]))
	}
	return gap
}

func (p *pinger) halt() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	p.conn.Close()
	<-p.done
}

// waitExchanges waits until the pinger completed n exchanges after t.
func waitExchanges(ctx context.Context, p *pinger, t time.Time, n int) error {
	for {
		got, err := p.since(t)
		if err != nil {
			return err
		}
		if got >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d exchanges after the restart, want %d: %w", got, n, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestAgentRestartKeepsConnections restarts the agent (gracefully, and by
// SIGKILL) while two kernel pods exchange data on one TCP connection: the
// TAP links are re-adopted and the connection carries on; IP allocations
// and attachments are kept; the sandbox's link re-attaches when a sandbox
// dials it again, and reaches a veth pod, whose link is re-adopted too. The outage (the longest pause between exchanges) is
// logged, not asserted.
func TestAgentRestartKeepsConnections(t *testing.T) {
	for _, how := range []string{"SIGTERM", "SIGKILL"} {
		t.Run(how, func(t *testing.T) {
			ctx := testContext(t)
			n := newNode(t, node.Options{})
			k1, k2, s1, _ := fourPods(t, ctx, n)
			v := addPod(t, ctx, n, "v", node.KindVeth)
			if _, err := n.Transfer(ctx, n.PodPeer(k1), n.PodPeer(s1), false, 1<<20); err != nil {
				t.Fatal(err)
			}
			allocs, err := n.Allocations()
			if err != nil {
				t.Fatal(err)
			}
			atts := attachmentKeys(t, ctx, n)
			p4 := startPinger(t, k1.NS, k2.NS, k2.Addr4)
			p6 := startPinger(t, k2.NS, k1.NS, k1.Addr6)
			time.Sleep(200 * time.Millisecond)

			if how == "SIGTERM" {
				if err := n.StopAgent(); err != nil {
					t.Fatalf("stop agent: %v", err)
				}
			} else if err := n.KillAgent(); err != nil {
				t.Fatal(err)
			}
			down := time.Now()
			if err := n.StartAgent(ctx); err != nil {
				t.Fatal(err)
			}
			ready := time.Since(down)
			for _, p := range []*pinger{p4, p6} {
				if err := waitExchanges(ctx, p, down, 100); err != nil {
					t.Fatalf("the connection across the restart: %v", err)
				}
			}
			t.Logf("%s: agent ready again after %v; longest pause of the IPv4 connection %v, of the IPv6 one %v",
				how, ready.Round(time.Millisecond), p4.longestGap().Round(time.Millisecond), p6.longestGap().Round(time.Millisecond))

			if got, err := n.Allocations(); err != nil || !reflect.DeepEqual(got, allocs) {
				t.Errorf("allocations after the restart %v (%v), want %v", got, err, allocs)
			}
			if got := attachmentKeys(t, ctx, n); !reflect.DeepEqual(got, atts) {
				t.Errorf("attachments after the restart %v, want %v", got, atts)
			}
			// The sandbox that held s1's link lost it with the agent;
			// a new one re-attaches and gets the same addresses.
			// The router reaches the veth pod again (its host link is
			// re-adopted).
			s1.StopServer()
			for _, v6 := range []bool{false, true} {
				for _, dst := range []*node.Pod{k2, v} {
					tr, err := n.Transfer(ctx, n.PodPeer(s1), n.PodPeer(dst), v6, 8<<20)
					if err != nil {
						t.Errorf("sandbox after the restart: %v", err)
					} else if tr.From != s1.Addr(v6) {
						t.Errorf("sandbox after the restart sends from %s, want %s", tr.From, s1.Addr(v6))
					}
				}
			}
		})
	}
}

// attachmentKeys lists the agent's attachments as container/ifname/kind.
func attachmentKeys(t *testing.T, ctx context.Context, n *node.Node) []string {
	t.Helper()
	atts, err := n.Attachments(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range atts {
		out = append(out, fmt.Sprintf("%s/%s/%s", a.ContainerID, a.IfName, a.Kind))
	}
	return out
}

// TestNodeReboot simulates a reboot: the agent dies, every pod netns and
// the runtime directories go, the state directory stays. The new agent
// releases every attachment and address of pods that no longer exist,
// holds no more than a fresh agent, and serves new pods.
func TestNodeReboot(t *testing.T) {
	ctx := testContext(t)
	n := newNode(t, node.Options{})
	base, err := footprint(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	var pods []*node.Pod
	for i := 0; i < 3; i++ {
		pods = append(pods, addPod(t, ctx, n, fmt.Sprintf("k%d", i), node.KindTap), addPod(t, ctx, n, fmt.Sprintf("s%d", i), node.KindShm))
	}
	if _, err := n.Transfer(ctx, n.PodPeer(pods[0]), n.PodPeer(pods[1]), false, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.KillAgent(); err != nil {
		t.Fatal(err)
	}
	pods[1].StopServer()
	for _, p := range pods {
		if err := n.RemovePodNetNS(p); err != nil {
			t.Fatal(err)
		}
	}
	// /run is a tmpfs: the sandbox sockets are gone after a reboot.
	entries, err := os.ReadDir(n.SandboxDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		os.Remove(filepath.Join(n.SandboxDir(), e.Name()))
	}

	if err := n.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if got := attachmentKeys(t, ctx, n); len(got) != 0 {
		t.Errorf("attachments after the reboot: %v, want none", got)
	}
	if got, err := n.Allocations(); err != nil || len(got) != 0 {
		t.Errorf("allocations after the reboot: %v (%v), want none", got, err)
	}
	if got, err := n.AttachmentRecords(); err != nil || len(got) != 0 {
		t.Errorf("attachment records after the reboot: %v (%v), want none", got, err)
	}
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	f, err := settledFootprint(sctx, n, base)
	if err != nil {
		t.Fatal(err)
	}
	checkFootprint(t, "after the reboot (before: a fresh agent)", f, base)
	// The runtime deletes the old pods: DEL succeeds for what is gone.
	for _, p := range pods {
		if err := n.DeletePod(ctx, p); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("DEL of %s after the reboot: %v", p.Name, err)
		}
	}
	a, b := addPod(t, ctx, n, "new-k", node.KindTap), addPod(t, ctx, n, "new-s", node.KindShm)
	if _, err := n.Transfer(ctx, n.PodPeer(a), n.PodPeer(b), true, 1<<20); err != nil {
		t.Errorf("new pods after the reboot: %v", err)
	}
}
