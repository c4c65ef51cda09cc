//go:build linux

package tap

import (
	"bytes"
	"testing"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/internal/frametest"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// newUnopenedTAP returns an endpoint without a device, enough for the
// methods that only build or parse headers.
func newUnopenedTAP(ethernet bool, gsoMaxSize uint32) *Endpoint {
	e := &Endpoint{framing: endpoint.FramingOf(ethernet), vnetHdr: true, gsoMaxSize: gsoMaxSize}
	addr := tcpip.LinkAddress("")
	if ethernet {
		addr = frametest.SrcMAC
	}
	e.linkAddr.Store(&addr)
	e.mtu.Store(1500)
	return e
}

// TestTAPOptionsValidate checks that New rejects inconsistent options
// before touching the fd.
func TestTAPOptionsValidate(t *testing.T) {
	ok := Options{FD: 3, MTU: 1500, EthernetHeader: true, LinkAddress: frametest.SrcMAC, VnetHdr: true, GSOMaxSize: 65535}
	tests := []struct {
		name    string
		mutate  func(*Options)
		wantErr bool
	}{
		{name: "valid tap", mutate: func(*Options) {}},
		{name: "valid tun", mutate: func(o *Options) { o.EthernetHeader, o.LinkAddress = false, "" }},
		{name: "negative fd", mutate: func(o *Options) { o.FD = -1 }, wantErr: true},
		{name: "mtu too small", mutate: func(o *Options) { o.MTU = 67 }, wantErr: true},
		{name: "mtu too large", mutate: func(o *Options) { o.MTU = 65536 }, wantErr: true},
		{name: "tap without mac", mutate: func(o *Options) { o.LinkAddress = "" }, wantErr: true},
		{name: "tun with mac", mutate: func(o *Options) { o.EthernetHeader = false }, wantErr: true},
		{name: "gso without vnet header", mutate: func(o *Options) { o.VnetHdr = false }, wantErr: true},
		{name: "gso too large", mutate: func(o *Options) { o.GSOMaxSize = 65536 }, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := ok
			tc.mutate(&o)
			if err := o.validate(); (err != nil) != tc.wantErr {
				t.Errorf("validate() = %v, want error %t", err, tc.wantErr)
			}
		})
	}
}

// stackTCPPacket builds an outgoing TCP packet the way the stack's TCP
// endpoint does with host GSO: pseudo-header sum in the checksum field and
// GSO options, link header not yet added.
func stackTCPPacket(v6 bool, payload []byte, mss uint16, flags header.TCPFlags) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.EthernetMinimumSize + header.IPv6MinimumSize + header.TCPMinimumSize,
		Payload:            buffer.MakeWithData(payload),
	})
	src, dst := frametest.Src4, frametest.Dst4
	if v6 {
		src, dst = frametest.Src6, frametest.Dst6
	}
	tcpLen := header.TCPMinimumSize + len(payload)
	tcp := header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize))
	tcp.Encode(&header.TCPFields{SrcPort: 1, DstPort: 2, SeqNum: 1000, AckNum: 1, DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 100})
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen)))
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	gso := stack.GSO{NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: mss, MaxSize: 65535}
	if v6 {
		header.IPv6(pkt.NetworkHeader().Push(header.IPv6MinimumSize)).Encode(&header.IPv6Fields{
			PayloadLength: uint16(tcpLen), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: src, DstAddr: dst,
		})
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
		gso.Type, gso.L3HdrLen = stack.GSOTCPv6, header.IPv6MinimumSize
	} else {
		ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(header.IPv4MinimumSize + tcpLen), ID: 77, TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
		gso.Type, gso.L3HdrLen = stack.GSOTCPv4, header.IPv4MinimumSize
	}
	pkt.GSOOptions = gso
	pkt.EgressRoute.RemoteLinkAddress = frametest.DstMAC
	return pkt
}

// TestTAPTxVnetHdrRoundTrip checks the virtio-net header written for the
// stack's packets, and that the same segmentation rules the kernel applies
// (here splitFrame's) turn header plus packet into valid segments.
func TestTAPTxVnetHdrRoundTrip(t *testing.T) {
	tests := []struct {
		name       string
		ethernet   bool
		v6         bool
		payload    int
		mss        uint16
		flags      header.TCPFlags
		gsoMaxSize uint32
		noGSO      bool
		want       virtioNetHdr
		wantSegs   int
	}{
		{
			name: "v4 tap super-packet", ethernet: true, payload: 2500, mss: 1000, gsoMaxSize: 65535,
			flags:    header.TCPFlagAck | header.TCPFlagPsh,
			want:     virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv4, hdrLen: 54, gsoSize: 1000, csumStart: 34, csumOffset: 16},
			wantSegs: 3,
		},
		{
			name: "v6 tun super-packet with CWR", v6: true, payload: 3000, mss: 1440, gsoMaxSize: 65535,
			flags:    header.TCPFlagAck | header.TCPFlagCwr,
			want:     virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv6 | virtioNetHdrGSOECN, hdrLen: 60, gsoSize: 1440, csumStart: 40, csumOffset: 16},
			wantSegs: 3,
		},
		{
			name: "v4 tap one segment: checksum only", ethernet: true, payload: 500, mss: 1000, gsoMaxSize: 65535,
			flags:    header.TCPFlagAck,
			want:     virtioNetHdr{flags: virtioNetHdrFNeedsCsum, hdrLen: 54, csumStart: 34, csumOffset: 16},
			wantSegs: 1,
		},
		{
			// A forwarded super-packet carries GSO options whether or not
			// the egress advertises GSO to the stack (endpoint's gso.go).
			name: "gso not advertised: forwarded packet", ethernet: true, payload: 2500, mss: 1000, gsoMaxSize: 0,
			flags:    header.TCPFlagAck,
			want:     virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv4, hdrLen: 54, gsoSize: 1000, csumStart: 34, csumOffset: 16},
			wantSegs: 3,
		},
		{
			name: "segments capped by the link MTU", ethernet: true, payload: 4000, mss: 1800, gsoMaxSize: 65535,
			flags:    header.TCPFlagAck,
			want:     virtioNetHdr{flags: virtioNetHdrFNeedsCsum, gsoType: virtioNetHdrGSOTCPv4, hdrLen: 54, gsoSize: 1460, csumStart: 34, csumOffset: 16},
			wantSegs: 3,
		},
		{
			name: "packet without gso options", v6: true, payload: 100, mss: 1000, gsoMaxSize: 65535, noGSO: true,
			flags: header.TCPFlagAck,
			want:  virtioNetHdr{},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newUnopenedTAP(tc.ethernet, tc.gsoMaxSize)
			payload := frametest.RandomBytes(tc.payload)
			pkt := stackTCPPacket(tc.v6, payload, tc.mss, tc.flags)
			defer pkt.DecRef()
			if tc.noGSO && tc.gsoMaxSize > 0 {
				pkt.GSOOptions = stack.GSO{}
			}
			e.AddHeader(pkt)
			got := e.txVnetHdr(pkt)
			if got != tc.want {
				t.Fatalf("txVnetHdr = %+v, want %+v", got, tc.want)
			}
			if tc.noGSO {
				return
			}
			var hb [virtioNetHdrLen]byte
			got.encode(&hb)
			wire := append(hb[:], bytes.Join(pkt.AsSlices(), nil)...)
			var out []byte
			n := 0
			_, err := splitFrame(wire, true, tc.ethernet, func(f []byte, _ bool) {
				n++
				seg, err := frametest.ParseSegment(f, tc.v6, tc.ethernet)
				if err != nil {
					t.Fatalf("segment %d: %v", n, err)
				}
				out = append(out, seg.Payload...)
			})
			if err != nil {
				t.Fatalf("splitFrame: %v", err)
			}
			if n != tc.wantSegs || !bytes.Equal(out, payload) {
				t.Errorf("got %d segments carrying %d bytes, want %d carrying the %d-byte payload", n, len(out), tc.wantSegs, len(payload))
			}
		})
	}
}

// TestTAPAddParseHeader checks the Ethernet header written on a TAP device
// and the protocol inferred when parsing TAP frames and TUN packets.
func TestTAPAddParseHeader(t *testing.T) {
	t.Run("add ethernet", func(t *testing.T) {
		e := newUnopenedTAP(true, 0)
		pkt := stackTCPPacket(true, nil, 0, header.TCPFlagAck)
		defer pkt.DecRef()
		e.AddHeader(pkt)
		eth := header.Ethernet(pkt.LinkHeader().Slice())
		if eth.SourceAddress() != frametest.SrcMAC || eth.DestinationAddress() != frametest.DstMAC || eth.Type() != header.IPv6ProtocolNumber {
			t.Errorf("ethernet header %s > %s type %#x", eth.SourceAddress(), eth.DestinationAddress(), eth.Type())
		}
	})
	t.Run("add nothing on tun", func(t *testing.T) {
		e := newUnopenedTAP(false, 0)
		pkt := stackTCPPacket(false, nil, 0, header.TCPFlagAck)
		defer pkt.DecRef()
		e.AddHeader(pkt)
		if n := len(pkt.LinkHeader().Slice()); n != 0 {
			t.Errorf("tun link header is %d bytes", n)
		}
	})

	v4, _ := frametest.TCPFrame{Flags: header.TCPFlagAck}.Build()
	v6, _ := frametest.TCPFrame{V6: true, Flags: header.TCPFlagAck}.Build()
	eth6, _ := frametest.TCPFrame{V6: true, Ethernet: true, Flags: header.TCPFlagAck}.Build()
	tests := []struct {
		name     string
		ethernet bool
		frame    []byte
		wantOK   bool
		want     tcpip.NetworkProtocolNumber
	}{
		{name: "tap ipv6", ethernet: true, frame: eth6, wantOK: true, want: header.IPv6ProtocolNumber},
		{name: "tap short", ethernet: true, frame: eth6[:10]},
		{name: "tun ipv4", frame: v4, wantOK: true, want: header.IPv4ProtocolNumber},
		{name: "tun ipv6", frame: v6, wantOK: true, want: header.IPv6ProtocolNumber},
		{name: "tun garbage", frame: []byte{0x10, 0, 0}},
		{name: "tun empty", frame: nil},
	}
	for _, tc := range tests {
		t.Run("parse "+tc.name, func(t *testing.T) {
			e := newUnopenedTAP(tc.ethernet, 0)
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(tc.frame)})
			defer pkt.DecRef()
			ok := e.ParseHeader(pkt)
			if ok != tc.wantOK || (ok && pkt.NetworkProtocolNumber != tc.want) {
				t.Errorf("ParseHeader = %t, proto %#x; want %t, %#x", ok, pkt.NetworkProtocolNumber, tc.wantOK, tc.want)
			}
		})
	}
}
