package node

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/shm-cni/shm-cni/test/e2e/pattern"
)

// PeerKind is what runs a peer's end of a transfer.
type PeerKind int

// Peer kinds.
const (
	// PeerKernel is a tap pod: kernel sockets in its netns.
	PeerKernel PeerKind = iota
	// PeerSandbox is a shm pod: the sandbox program's netstack.
	PeerSandbox
	// PeerHost is the host namespace: kernel sockets there.
	PeerHost
	// PeerOutside is the outside namespace beyond the host.
	PeerOutside
)

// String names the kind.
func (k PeerKind) String() string {
	switch k {
	case PeerKernel:
		return "kernel"
	case PeerSandbox:
		return "sandbox"
	case PeerHost:
		return "host"
	case PeerOutside:
		return "outside"
	}
	return "PeerKind(" + strconv.Itoa(int(k)) + ")"
}

// Peer is one end of a transfer.
type Peer struct {
	Name string
	Kind PeerKind
	// NS is the peer's network namespace.
	NS ns.NetNS
	// Pod is the pod of a kernel or sandbox peer.
	Pod *Pod
	// Addr4 and Addr6 are where the peer is reached and what it listens
	// on.
	Addr4, Addr6 netip.Addr
}

// Addr returns the peer's address of a family.
func (p *Peer) Addr(v6 bool) netip.Addr {
	if v6 {
		return p.Addr6
	}
	return p.Addr4
}

// PodPeer returns the peer of a pod.
func (n *Node) PodPeer(p *Pod) *Peer {
	k := PeerKernel
	if p.Kind == KindShm {
		k = PeerSandbox
	}
	return &Peer{Name: p.Name, Kind: k, NS: p.NS, Pod: p, Addr4: p.Addr4, Addr6: p.Addr6}
}

// HostPeer returns the host namespace's peer, reached at the node gateway
// addresses.
func (n *Node) HostPeer() *Peer {
	return &Peer{Name: "host", Kind: PeerHost, NS: n.Host, Addr4: n.Gateway4, Addr6: n.Gateway6}
}

// OutsidePeer returns the outside namespace's peer.
func (n *Node) OutsidePeer() *Peer {
	return &Peer{Name: "outside", Kind: PeerOutside, NS: n.Outside, Addr4: Outside4.Addr(), Addr6: Outside6.Addr()}
}

// ExpectedSource is the source address dst must see for a connection from
// src: the pod's own address inside the cluster (no NAT), the node gateway
// address for the host, and the host's outside address for anything that
// leaves the node (masquerade, unless the node runs without).
func (n *Node) ExpectedSource(src, dst *Peer, v6 bool) netip.Addr {
	switch {
	case dst.Kind == PeerOutside && src.Pod != nil && n.opts.NoMasquerade:
		return src.Addr(v6)
	case dst.Kind == PeerOutside && v6:
		return HostOutside6.Addr()
	case dst.Kind == PeerOutside:
		return HostOutside4.Addr()
	case src.Kind == PeerHost:
		return n.Gateway(v6)
	}
	return src.Addr(v6)
}

// Transfer is the outcome of one verified transfer.
type Transfer struct {
	// Bytes the receiver verified.
	Bytes int64
	// Sent is the bytes the sender sent: Bytes, once checked.
	Sent int64
	// Duration from the sender's connection to the receiver's close, as
	// the sender measured it.
	Duration time.Duration
	// From is the source address the receiver saw.
	From netip.Addr
	// Sender is how a sandbox sender's TCP fared; nil for other senders.
	Sender *SenderTCP
}

// Amount is how much a transfer sends: Bytes, or whatever it sends in
// Duration when that is set (a benchmark's timed transfer).
type Amount struct {
	Bytes    int64
	Duration time.Duration
}

// SenderArgs are the sandbox program's flags for sending a.
func (a Amount) SenderArgs() []string {
	if a.Duration > 0 {
		return []string{"--duration", a.Duration.String()}
	}
	return []string{"--bytes", strconv.FormatInt(a.Bytes, 10)}
}

// MiBps is the transfer's throughput in MiB/s.
func (t Transfer) MiBps() float64 {
	if t.Duration <= 0 {
		return 0
	}
	return float64(t.Bytes) / (1 << 20) / t.Duration.Seconds()
}

// Transfer sends size pattern bytes over one TCP connection from src to dst
// (IPv6 when v6) and returns once the receiver has checked every byte and
// closed. A sandbox sender first stops the sandbox serving on its link;
// a sandbox receiver is started when none serves. It fails when fewer bytes
// arrived or any was wrong; the caller checks Transfer.From.
func (n *Node) Transfer(ctx context.Context, src, dst *Peer, v6 bool, size int64) (Transfer, error) {
	return n.TransferVia(ctx, src, dst, v6, size, netip.Addr{})
}

// TransferVia is Transfer with the sender connecting to via (the receiver's
// port) instead of dst's address: an address the network translates to
// dst's, such as a Service's. The zero via is dst's address.
func (n *Node) TransferVia(ctx context.Context, src, dst *Peer, v6 bool, size int64, via netip.Addr) (Transfer, error) {
	return n.TransferAmount(ctx, src, dst, v6, Amount{Bytes: size}, via)
}

// TransferAmount is TransferVia sending amt. With amt.Duration set, the
// sender sends for that long and the caller checks that Bytes is Sent: a
// sandbox sink reports its connections in the order they end, so
// concurrent timed transfers to one sandbox may each read another's
// report, and only their sums must agree.
func (n *Node) TransferAmount(ctx context.Context, src, dst *Peer, v6 bool, amt Amount, via netip.Addr) (Transfer, error) {
	tr, err := n.transfer(ctx, src, dst, v6, amt, via)
	if err != nil {
		return tr, fmt.Errorf("%s -> %s %s: %w", src.Name, dst.Name, family(v6), err)
	}
	return tr, nil
}

func (n *Node) transfer(ctx context.Context, src, dst *Peer, v6 bool, amt Amount, via netip.Addr) (Transfer, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if src.Kind == PeerSandbox {
		// One sandbox per link: the sender's own server goes.
		src.Pod.stopServer()
	}

	// The receiver.
	var (
		to   netip.AddrPort
		recv func() (int64, netip.Addr, error)
	)
	if dst.Kind == PeerSandbox {
		sb, err := dst.Pod.ensureSink(ctx)
		if err != nil {
			return Transfer{}, err
		}
		to = netip.AddrPortFrom(dst.Addr(v6), SinkPort)
		recv = func() (int64, netip.Addr, error) {
			l, err := sb.nextLine(ctx, "sink: ")
			if err != nil {
				return 0, netip.Addr{}, err
			}
			got, from, verified, err := ParseSinkLine(l)
			if err == nil && verified == n.opts.NoVerify {
				err = fmt.Errorf("sandbox sink report %q: verified %t, want %t", l, verified, !n.opts.NoVerify)
			}
			return got, from, err
		}
	} else {
		ln, err := ListenIn(dst.NS, netip.AddrPortFrom(dst.Addr(v6), 0))
		if err != nil {
			return Transfer{}, err
		}
		defer ln.Close()
		to = netip.AddrPortFrom(dst.Addr(v6), uint16(ln.Addr().(*net.TCPAddr).Port))
		res := sinkOnce(ctx, ln, !n.opts.NoVerify)
		recv = func() (int64, netip.Addr, error) {
			r := <-res
			return r.n, r.from, r.err
		}
	}

	if via.IsValid() {
		to = netip.AddrPortFrom(via, to.Port())
	}

	// The sender.
	var (
		sent   int64
		d      time.Duration
		sender *SenderTCP
		err    error
	)
	if src.Kind == PeerSandbox {
		sent, d, sender, err = n.sandboxSend(ctx, src.Pod, to, amt)
	} else {
		sent, d, err = sendFrom(ctx, src.NS, to, amt, !n.opts.NoVerify)
	}
	if err == nil && sent == 0 {
		err = fmt.Errorf("sent nothing in %v", amt.Duration)
	}
	if err != nil {
		return Transfer{}, fmt.Errorf("send: %w", err)
	}
	got, from, err := recv()
	tr := Transfer{Bytes: got, Sent: sent, Duration: d, From: from, Sender: sender}
	if err != nil {
		return tr, fmt.Errorf("receive: %w", err)
	}
	if amt.Duration == 0 && got != sent {
		return tr, fmt.Errorf("receiver got %d bytes, want %d", got, sent)
	}
	return tr, nil
}

func family(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// ListenIn opens a TCP listener on ap inside n (port 0 picks one).
func ListenIn(n ns.NetNS, ap netip.AddrPort) (*net.TCPListener, error) {
	var ln *net.TCPListener
	err := n.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s in %s: %w", ap, n.Path(), err)
	}
	return ln, nil
}

// sinkResult is what a kernel-side receiver verified.
type sinkResult struct {
	n    int64
	from netip.Addr
	err  error
}

// sinkOnce accepts one connection on ln, checks the pattern to its end (or,
// without verify, counts the bytes) and closes it. ctx's end (or closing ln)
// stops it.
func sinkOnce(ctx context.Context, ln *net.TCPListener, verify bool) <-chan sinkResult {
	ch := make(chan sinkResult, 1)
	go func() {
		stopAccept := context.AfterFunc(ctx, func() { ln.Close() })
		c, err := ln.AcceptTCP()
		stopAccept()
		if err != nil {
			ch <- sinkResult{err: fmt.Errorf("accept: %w", err)}
			return
		}
		defer c.Close()
		stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
		defer stop()
		read := pattern.Check
		if !verify {
			read = pattern.Count
		}
		n, err := read(c)
		ch <- sinkResult{n: n, from: c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(), err: err}
	}()
	return ch
}

// SendFrom connects from inside n to to, sends size pattern bytes, closes
// its side and waits for the receiver to close: everything arrived. It
// returns the time from the connection to the receiver's close.
func SendFrom(ctx context.Context, n ns.NetNS, to netip.AddrPort, size int64) (time.Duration, error) {
	_, d, err := sendFrom(ctx, n, to, Amount{Bytes: size}, true)
	return d, err
}

// SendZerosFrom is SendFrom sending amt of zeros instead of the pattern:
// for benchmarks. It returns the bytes sent too.
func SendZerosFrom(ctx context.Context, n ns.NetNS, to netip.AddrPort, amt Amount) (int64, time.Duration, error) {
	return sendFrom(ctx, n, to, amt, false)
}

// sendFrom is SendFrom sending amt, zeros instead of the pattern without
// verify; it returns the bytes sent too.
func sendFrom(ctx context.Context, n ns.NetNS, to netip.AddrPort, amt Amount, verify bool) (int64, time.Duration, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", to.String())
		return err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("connect to %s: %w", to, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	start := time.Now()
	sent := amt.Bytes
	if amt.Duration > 0 {
		sent, err = pattern.SendFor(c, amt.Duration, !verify)
	} else if verify {
		err = pattern.Send(c, sent)
	} else {
		err = pattern.SendZeros(c, sent)
	}
	if err != nil {
		return 0, 0, err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return 0, 0, fmt.Errorf("close write: %w", err)
	}
	if _, err := io.Copy(io.Discard, c); err != nil {
		return 0, 0, fmt.Errorf("wait for the receiver: %w", err)
	}
	return sent, time.Since(start), nil
}

// sandboxSend runs a sandbox on p's link that sends amt of the pattern to
// to, and returns the bytes it sent and the time it reports from
// connection to the receiver's close.
func (n *Node) sandboxSend(ctx context.Context, p *Pod, to netip.AddrPort, amt Amount) (int64, time.Duration, *SenderTCP, error) {
	args := append([]string{"--mode", "send", "--to", to.String(), "--verify=" + strconv.FormatBool(!n.opts.NoVerify)}, amt.SenderArgs()...)
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) > time.Second {
		args = append(args, "--timeout", time.Until(dl).Round(time.Second).String())
	}
	s, err := n.StartSandbox(p, args...)
	if err != nil {
		return 0, 0, nil, err
	}
	l, lerr := s.nextLine(ctx, "sent ")
	var tl string
	if lerr == nil {
		tl, lerr = s.nextLine(ctx, "tcp: ")
	}
	if err := s.Wait(ctx); err != nil {
		return 0, 0, nil, err
	}
	if lerr != nil {
		return 0, 0, nil, lerr
	}
	got, d, err := ParseSentLine(l)
	if err != nil {
		return 0, 0, nil, err
	}
	if amt.Duration == 0 && got != amt.Bytes {
		return 0, 0, nil, fmt.Errorf("sandbox sent %d bytes, want %d", got, amt.Bytes)
	}
	tcp, err := ParseTCPLine(tl)
	if err != nil {
		return 0, 0, nil, err
	}
	return got, d, &tcp, nil
}
