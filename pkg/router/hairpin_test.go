package router

import (
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// tcp4 returns an IPv4 TCP segment without payload.
func tcp4(src, dst netip.Addr, sport, dport uint16, flags header.TCPFlags) []byte {
	b := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	header.IPv4(b).Encode(&header.IPv4Fields{
		TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(src.As4()), DstAddr: tcpip.AddrFrom4(dst.As4()),
	})
	header.IPv4(b).SetChecksum(^header.IPv4(b).CalculateChecksum())
	header.TCP(b[header.IPv4MinimumSize:]).Encode(&header.TCPFields{
		SrcPort: sport, DstPort: dport, DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 1000,
	})
	return b
}

// unreachable4 returns an ICMP port unreachable from src to dst quoting
// quoted's first 28 bytes.
func unreachable4(src, dst netip.Addr, quoted []byte) []byte {
	body := quoted[:header.IPv4MinimumSize+8]
	b := make([]byte, header.IPv4MinimumSize+header.ICMPv4MinimumSize+len(body))
	header.IPv4(b).Encode(&header.IPv4Fields{
		TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(src.As4()), DstAddr: tcpip.AddrFrom4(dst.As4()),
	})
	icmp := header.ICMPv4(b[header.IPv4MinimumSize:])
	icmp.SetType(header.ICMPv4DstUnreachable)
	icmp.SetCode(header.ICMPv4PortUnreachable)
	copy(icmp[header.ICMPv4MinimumSize:], body)
	return b
}

func packetOf(b []byte) *stack.PacketBuffer {
	return stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
}

// TestHairpinTable: the table takes in a connection the uplink brings from a
// local pod to a local pod, claims its endpoint's replies and ICMP errors
// about it (not the client's packets, not another connection's), ignores
// what is not between local pods, bounds every client's share and the
// whole, and lets entries go after their timeouts.
func TestHairpinTable(t *testing.T) {
	client, server, other, remote := netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("10.1.0.3"),
		netip.MustParseAddr("10.1.0.4"), netip.MustParseAddr("10.2.0.9")
	local := func(a netip.Addr) bool { return a == client || a == server || a == other }
	v4 := header.IPv4ProtocolNumber
	tab := newHairpinTable(local)
	in := func(b []byte) bool { p := packetOf(b); defer p.DecRef(); return tab.fromUplink(v4, p) }
	reply := func(b []byte) bool { p := packetOf(b); defer p.DecRef(); return tab.reply(v4, p) }

	if reply(tcp4(server, client, 80, 40000, header.TCPFlagSyn|header.TCPFlagAck)) {
		t.Fatal("empty table claimed a packet")
	}
	if !in(tcp4(remote, server, 40000, 80, header.TCPFlagSyn)) || !in(tcp4(client, netip.MustParseAddr("10.96.0.1"), 40000, 80, header.TCPFlagSyn)) {
		t.Fatal("refused a packet it has no business with")
	}
	if n := tab.n.Load(); n != 0 {
		t.Fatalf("took in %d connections not between local pods", n)
	}
	syn := tcp4(client, server, 40000, 80, header.TCPFlagSyn)
	if !in(syn) || !in(syn) {
		t.Fatal("refused a hairpin connection")
	}
	if n, added := tab.n.Load(), tab.added.Load(); n != 1 || added != 1 {
		t.Fatalf("after one connection (twice its SYN): %d entries, %d added; want 1, 1", n, added)
	}
	for _, c := range []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"the endpoint's SYN-ACK", tcp4(server, client, 80, 40000, header.TCPFlagSyn|header.TCPFlagAck), true},
		{"the client's segment", tcp4(client, server, 40000, 80, header.TCPFlagAck), false},
		{"another port of the client", tcp4(server, client, 80, 40001, header.TCPFlagAck), false},
		{"another pod to the client", tcp4(other, client, 80, 40000, header.TCPFlagAck), false},
		{"an ICMP error about the client's segment", unreachable4(server, client, syn), true},
		{"an ICMP error about another connection", unreachable4(server, client, tcp4(client, server, 40001, 80, header.TCPFlagSyn)), false},
	} {
		if got := reply(c.pkt); got != c.want {
			t.Errorf("%s: claimed %v, want %v", c.name, got, c.want)
		}
	}

	// Bounds: a client's share, then the whole table.
	for p := 1; p < hairpinClientShare; p++ {
		if !in(tcp4(client, server, uint16(40000+p), 80, header.TCPFlagSyn)) {
			t.Fatalf("refused the client's connection %d of its share %d", p+1, hairpinClientShare)
		}
	}
	if in(tcp4(client, server, 30000, 80, header.TCPFlagSyn)) {
		t.Fatalf("took in a connection beyond the client's share")
	}
	if !in(tcp4(other, server, 30000, 80, header.TCPFlagSyn)) {
		t.Fatalf("refused another client's connection because one client used its share")
	}
	if got := tab.refused.Load(); got != 1 {
		t.Errorf("refused counter %d, want 1", got)
	}

	// Timeouts: a closing TCP connection goes after hairpinTCPClosing,
	// an established one stays.
	if !in(tcp4(client, server, 40000, 80, header.TCPFlagFin|header.TCPFlagAck)) {
		t.Fatal("refused the FIN of a known connection")
	}
	tab.epoch = tab.epoch.Add(-hairpinTCPClosing - time.Second)
	tab.expire()
	if reply(tcp4(server, client, 80, 40000, header.TCPFlagAck)) {
		t.Error("a closed connection's entry outlived its timeout")
	}
	if !reply(tcp4(server, client, 80, 40001, header.TCPFlagAck)) {
		t.Error("an established connection's entry did not outlive the closing timeout")
	}
	tab.epoch = tab.epoch.Add(-hairpinTCPEstablished)
	tab.expire()
	if n := tab.n.Load(); n != 0 {
		t.Errorf("%d entries after every timeout, want 0", n)
	}
	if len(tab.clients) != 0 {
		t.Errorf("clients still charged after every entry went: %v", tab.clients)
	}
}
