// Command hostile is the end-to-end tests' hostile sandbox: it attaches to a
// shm-cni sandbox link like a sandbox would, then misbehaves:
//
//	hostile --socket S --mode garbage     scribble random bytes over its shared pages and rings
//	hostile --socket S --mode flood --to A:P   send UDP frames as fast as it can
//	hostile --socket S --mode stall       attach, then never consume what it is sent
//	hostile --socket S --mode spin        attach, then burn one CPU without touching the link
//	                                      (the CPU-hungry but harmless reference for flood)
//	hostile --socket S --mode reconnect --count N   attach and hang up N times, some mid-exchange
//	hostile --socket S --mode spoof --to A:P --as B --as-mac M
//	                                      send frames spoofed as B (addresses and MAC), ARP and
//	                                      NDP claims for B, and packets for the host's loopback,
//	                                      then one honest UDP datagram to A:P
//
// It prints "attached" once it holds the link and "done <mode> <count>" at
// the end (count: frames written, or attachments). garbage ends when the
// agent hangs up ("cut off") or after --duration; flood and stall run for
// --duration, spin too. The random bytes come from a fixed seed (--seed).
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/internal/tcpipx"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

func main() { os.Exit(run()) }

type options struct {
	socket   string
	mode     string
	to       netip.AddrPort
	as       netip.Addr
	asMAC    tcpip.LinkAddress
	duration time.Duration
	count    int
	seed     uint64
}

func run() int {
	var o options
	var to, as, asMAC string
	flag.StringVar(&o.socket, "socket", "", "the link's socket (socketPath of the CNI result)")
	flag.StringVar(&o.mode, "mode", "", "garbage, flood, stall, spin, reconnect or spoof")
	flag.StringVar(&to, "to", "", "address:port frames go to (flood, spoof)")
	flag.StringVar(&as, "as", "", "the address to impersonate (spoof)")
	flag.StringVar(&asMAC, "as-mac", "02:00:00:00:00:99", "the MAC to impersonate (spoof)")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "how long to misbehave (garbage, flood, stall)")
	flag.IntVar(&o.count, "count", 100, "attachments (reconnect)")
	flag.Uint64Var(&o.seed, "seed", 1, "random seed")
	flag.Parse()
	var err error
	if to != "" {
		if o.to, err = netip.ParseAddrPort(to); err != nil {
			return fail(fmt.Errorf("--to: %w", err))
		}
	}
	if as != "" {
		if o.as, err = netip.ParseAddr(as); err != nil {
			return fail(fmt.Errorf("--as: %w", err))
		}
	}
	mac, err := net.ParseMAC(asMAC)
	if err != nil {
		return fail(fmt.Errorf("--as-mac: %w", err))
	}
	o.asMAC = tcpip.LinkAddress(mac)
	if o.socket == "" {
		return fail(errors.New("--socket is required"))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	var n int
	switch o.mode {
	case "garbage":
		n, err = garbage(ctx, o)
	case "flood":
		n, err = flood(ctx, o)
	case "stall":
		n, err = stall(ctx, o)
	case "spin":
		n, err = spin(ctx, o)
	case "reconnect":
		n, err = reconnect(ctx, o)
	case "spoof":
		n, err = spoof(ctx, o)
	default:
		err = fmt.Errorf("--mode %q: want garbage, flood, stall, spin, reconnect or spoof", o.mode)
	}
	if err != nil {
		return fail(err)
	}
	fmt.Printf("done %s %d\n", o.mode, n)
	return 0
}

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "hostile:", err)
	return 1
}

// attachRaw dials the link for its queue pair, without an endpoint, and
// says "attached". The function it returns closes the connection and the
// pair.
func attachRaw(ctx context.Context, o options) (*net.UnixConn, queue.Pair, func(), error) {
	conn, pair, _, err := shm.DialPair(ctx, o.socket)
	if err != nil {
		return nil, queue.Pair{}, nil, err
	}
	fmt.Println("attached")
	return conn, pair, func() { conn.Close(); pair.Close() }, nil
}

// garbage attaches, maps its queues as the agent shares them and overwrites
// the rings, the shared pages and the data regions with random bytes, waking
// the agent after each round, until the agent hangs up or time is up.
func garbage(ctx context.Context, o options) (int, error) {
	conn, pair, hangUp, err := attachRaw(ctx, o)
	if err != nil {
		return 0, err
	}
	defer hangUp()
	rng := rand.New(rand.NewPCG(o.seed, 0))
	var regions [][]byte
	for _, q := range []queue.QueueFDs{pair.TX, pair.RX} {
		data, tx, rx, shared, unmap, err := queue.PeerView(q)
		if err != nil {
			return 0, err
		}
		defer unmap()
		regions = append(regions, tx, rx, shared, data[:min(len(data), 1<<16)])
	}
	hungUp := make(chan struct{})
	go func() {
		var b [1]byte
		conn.Read(b[:]) // the agent never writes: this returns when it hangs up
		close(hungUp)
	}()
	deadline := time.After(o.duration)
	rounds := 0
	for {
		for _, r := range regions {
			for i := 0; i < 64; i++ {
				off := rng.IntN(len(r))
				r[off] = byte(rng.Uint32())
				binary.LittleEndian.PutUint64(r[off&^7:], rng.Uint64())
			}
		}
		rounds++
		for _, q := range []queue.QueueFDs{pair.TX, pair.RX} {
			var one [8]byte
			binary.NativeEndian.PutUint64(one[:], 1)
			unix.Write(q.Event, one[:])
		}
		select {
		case <-hungUp:
			fmt.Println("cut off")
			return rounds, nil
		case <-deadline:
			return rounds, nil
		case <-ctx.Done():
			return rounds, nil
		case <-time.After(time.Millisecond):
		}
	}
}

// client attaches a client endpoint whose received frames are discarded.
func client(ctx context.Context, o options) (*shm.Client, shm.LinkConfig, error) {
	c, cfg, err := shm.Dial(ctx, o.socket, shm.DialOptions{})
	if err != nil {
		return nil, shm.LinkConfig{}, err
	}
	c.Attach(discard{})
	fmt.Println("attached")
	return c, cfg, nil
}

func closeClient(c *shm.Client) {
	c.Attach(nil)
	c.Close()
	c.Wait()
}

type discard struct{}

func (discard) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
func (discard) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}

// send writes raw Ethernet frames on c.
func send(c *shm.Client, frames ...[]byte) {
	var pkts stack.PacketBufferList
	for _, f := range frames {
		pkts.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(f)}))
	}
	c.WritePackets(pkts)
	pkts.Reset()
}

// flood sends UDP frames from the sandbox's own address to o.to, in batches
// of 64, as fast as the link takes them.
func flood(ctx context.Context, o options) (int, error) {
	c, cfg, err := client(ctx, o)
	if err != nil {
		return 0, err
	}
	defer closeClient(c)
	src, err := ownAddr(cfg, o.to.Addr().Is4())
	if err != nil {
		return 0, err
	}
	frame := ethernet(tcpip.LinkAddress(mustMAC(cfg.MAC)), mustMAC(cfg.GatewayMAC), ipUDP(src, o.to, make([]byte, 1024)))
	batch := make([][]byte, 64)
	for i := range batch {
		batch[i] = frame
	}
	deadline := time.Now().Add(o.duration)
	n := 0
	for time.Now().Before(deadline) && ctx.Err() == nil {
		send(c, batch...)
		n += len(batch)
	}
	return n, nil
}

// stall attaches and consumes nothing for o.duration: frames for it fill its
// receive queue, and the agent must drop them.
func stall(ctx context.Context, o options) (int, error) {
	_, _, hangUp, err := attachRaw(ctx, o)
	if err != nil {
		return 0, err
	}
	defer hangUp()
	select {
	case <-time.After(o.duration):
	case <-ctx.Done():
	}
	return 0, nil
}

// spin attaches and then spins on one CPU for o.duration, touching neither
// the link nor the agent: what a flooding sandbox costs its node's CPU by
// itself, without the agent's share.
func spin(ctx context.Context, o options) (int, error) {
	_, _, hangUp, err := attachRaw(ctx, o)
	if err != nil {
		return 0, err
	}
	defer hangUp()
	deadline := time.Now().Add(o.duration)
	n := 0
	for ctx.Err() == nil && time.Now().Before(deadline) {
		for range 1 << 16 {
			n++
		}
	}
	return n, nil
}

// reconnect attaches and hangs up o.count times; every third time it hangs
// up before reading the link config, every third after mapping nothing.
func reconnect(ctx context.Context, o options) (int, error) {
	n := 0
	for i := 0; i < o.count && ctx.Err() == nil; i++ {
		if i%3 == 0 {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unixpacket", o.socket)
			if err != nil {
				return n, fmt.Errorf("attach %d: %w", i, err)
			}
			c.Close()
			continue
		}
		// The agent may not have seen the last hang-up yet: retry a
		// refusal for a moment.
		var conn *net.UnixConn
		var pair queue.Pair
		var err error
		for try := 0; try < 200; try++ {
			if conn, pair, _, err = shm.DialPair(ctx, o.socket); err == nil || !errors.Is(err, shm.ErrDialRefused) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err != nil {
			return n, fmt.Errorf("attach %d: %w", i, err)
		}
		n++
		pair.Close()
		conn.Close()
	}
	fmt.Println("attached")
	return n, nil
}

// spoof sends what a pod must not: frames with another pod's addresses and
// MAC, ARP and NDP claims for another pod's address, packets for the host's
// loopback; then one honest datagram to o.to, which the receiver counts.
func spoof(ctx context.Context, o options) (int, error) {
	c, cfg, err := client(ctx, o)
	if err != nil {
		return 0, err
	}
	defer closeClient(c)
	v4 := o.to.Addr().Is4()
	own, err := ownAddr(cfg, v4)
	if err != nil {
		return 0, err
	}
	mac, gw := tcpip.LinkAddress(mustMAC(cfg.MAC)), mustMAC(cfg.GatewayMAC)
	payload := []byte("spoofed")
	loopback := netip.MustParseAddr("127.0.0.1")
	if !v4 {
		loopback = netip.IPv6Loopback()
	}
	frames := [][]byte{
		// Another pod's source address, from our MAC.
		ethernet(mac, gw, ipUDP(o.as, o.to, payload)),
		// Our address from another MAC.
		ethernet(o.asMAC, gw, ipUDP(own, o.to, payload)),
		// An address outside every pod CIDR.
		ethernet(mac, gw, ipUDP(outsideAddr(v4), o.to, payload)),
		// The host's loopback (where the agent's metrics listen).
		ethernet(mac, gw, ipUDP(own, netip.AddrPortFrom(loopback, 9309), payload)),
	}
	if v4 {
		frames = append(frames, ethernetType(mac, gw, header.ARPProtocolNumber, arpReply(mac, o.as)))
	} else {
		frames = append(frames, ethernet(mac, gw, neighborAdvert(own, o.as, mac)))
	}
	for i := 0; i < 10; i++ {
		send(c, frames...)
	}
	// The honest datagram, marked so the receiver can tell it apart.
	send(c, ethernet(mac, gw, ipUDP(own, o.to, []byte("honest"))))
	// Let the agent take the frames before hanging up.
	time.Sleep(200 * time.Millisecond)
	return 10*len(frames) + 1, nil
}

func ownAddr(cfg shm.LinkConfig, v4 bool) (netip.Addr, error) {
	for _, p := range cfg.Addresses {
		if p.Addr().Is4() == v4 {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("the link has no address of that family (%v)", cfg.Addresses)
}

func outsideAddr(v4 bool) netip.Addr {
	if v4 {
		return netip.MustParseAddr("192.0.2.66")
	}
	return netip.MustParseAddr("2001:db8:ffff::66")
}

func mustMAC(s string) tcpip.LinkAddress {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err) // validated by shm.ParseLinkConfig
	}
	return tcpip.LinkAddress(m)
}

func ethernet(src, dst tcpip.LinkAddress, ip []byte) []byte {
	proto := header.IPv4ProtocolNumber
	if header.IPVersion(ip) == header.IPv6Version {
		proto = header.IPv6ProtocolNumber
	}
	return ethernetType(src, dst, proto, ip)
}

func ethernetType(src, dst tcpip.LinkAddress, proto tcpip.NetworkProtocolNumber, payload []byte) []byte {
	f := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: src, DstAddr: dst, Type: proto})
	copy(f[header.EthernetMinimumSize:], payload)
	return f
}

// ipUDP builds an IPv4 or IPv6 UDP packet with valid checksums.
func ipUDP(src netip.Addr, dst netip.AddrPort, payload []byte) []byte {
	u := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(u).Encode(&header.UDPFields{SrcPort: 40000, DstPort: dst.Port(), Length: uint16(len(u))})
	copy(u[header.UDPMinimumSize:], payload)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, tcpipx.Addr(src), tcpipx.Addr(dst.Addr()), uint16(len(u)))
	xsum = checksum.Combine(xsum, checksum.Checksum(payload, 0))
	header.UDP(u).SetChecksum(^header.UDP(u).CalculateChecksum(xsum))
	return ipPacket(src, dst.Addr(), header.UDPProtocolNumber, u)
}

// ipPacket builds an IPv4 packet with TTL 64 or an IPv6 one with hop
// limit 255.
func ipPacket(src, dst netip.Addr, proto tcpip.TransportProtocolNumber, payload []byte) []byte {
	hops := uint8(64)
	if src.Is6() {
		hops = 255
	}
	return tcpipx.IPPacket(src, dst, proto, hops, payload)
}

// arpReply claims ip for mac.
func arpReply(mac tcpip.LinkAddress, ip netip.Addr) []byte {
	b := make([]byte, header.ARPSize)
	a := header.ARP(b)
	a.SetIPv4OverEthernet()
	a.SetOp(header.ARPReply)
	copy(a.HardwareAddressSender(), mac)
	copy(a.ProtocolAddressSender(), ip.AsSlice())
	copy(a.ProtocolAddressTarget(), netip.MustParseAddr("169.254.1.1").AsSlice())
	return b
}

// neighborAdvert claims target for mac, to the gateway.
func neighborAdvert(src, target netip.Addr, mac tcpip.LinkAddress) []byte {
	gw := netip.MustParseAddr("fe80::1")
	m := header.ICMPv6(make([]byte, header.ICMPv6NeighborAdvertMinimumSize+8))
	m.SetType(header.ICMPv6NeighborAdvert)
	na := header.NDPNeighborAdvert(m.MessageBody())
	na.SetOverrideFlag(true)
	na.SetTargetAddress(tcpipx.Addr(target))
	opt := m[header.ICMPv6NeighborAdvertMinimumSize:]
	opt[0], opt[1] = 2, 1 // target link-layer address, 8 bytes
	copy(opt[2:], mac)
	m.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: m, Src: tcpipx.Addr(src), Dst: tcpipx.Addr(gw)}))
	return ipPacket(src, gw, header.ICMPv6ProtocolNumber, m)
}
