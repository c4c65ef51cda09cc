package shm

import (
	"fmt"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// TCP segmentation offload from a sandbox to the router (TSO).
//
// A sandbox's netstack cuts its stream at the MSS its peer announced: 1460
// bytes toward a host beyond the uplink, however large its own link's MTU.
// Each segment then costs the sandbox a pass through its TCP and IP layers
// and a frame on the queue, and the router a frame to handle. With the
// offload, as a virtio-net device offers a guest, the sandbox's stack hands
// its link TCP super-packets of up to the link's MTU with a partial checksum
// (gVisor's host GSO), and the link puts each on the queue whole, flagged in
// its TX descriptor's meta word:
//
//	bit 31      a TCP super-packet: its TCP checksum field holds the
//	            pseudo-header sum (the rest is the receiver's to complete)
//	bit 16      IPv6 (else IPv4)
//	bits 0..15  the MSS to cut it at (not zero)
//	other bits  zero
//
// The router delivers such a frame with the GSO mark of pkg/endpoint/gso.go: the egress
// link writes it whole to a kernel, which segments it at the MSS, or
// segments it in software. The server offers the offload in the link config
// (LinkConfig.TxGSO); a client that does not know it sends plain frames, and
// a flagged frame on a link that was not offered it, or a meta word that
// breaks the rules above, is a protocol violation. The frame's contents are
// checked as any frame's: one whose headers do not parse as TCP of the
// flagged version is dropped.
//
// A packet the stack gives the link that is no larger than one segment is
// flagged the same way, its checksum partial too: the router passes it on
// as a super-packet of one segment, so that the checksum of a sandbox's
// 64 KiB segment to a kernel pod, the host or another sandbox that takes
// checksum offload is never summed at all (the kernel takes a partial
// checksum for local delivery as it does from a veth peer), and one to a
// link that takes neither is completed by the router.
//
// Checksum offload from the router to a sandbox (RxGSO) is the same word in
// the other direction, in the RX completion's reserved word: a TCP packet
// whose checksum field holds the pseudo-header sum, to be taken as checked.
// The router forwards TCP packets from kernels (a kernel pod's super-packets,
// whose checksums the kernel left partial, as a virtio-net device gets them)
// and checks nothing of their data: completing a 64 KiB sum for the sandbox
// to verify it again costs both sides a pass over every byte, which the
// kernel does not make for a veth peer either. A flagged frame fits the
// link's MTU, as every frame does (a super-packet that does not fit is cut
// into segments with full checksums): the sandbox's TCP takes it as one
// segment. The server offers it in the link config
// (LinkConfig.RxGSO); a client that takes it says so by writing the byte
// rxOffloadAccept on the peer socket, its only write there, and the server
// flags frames from then on. A client that does not know it never writes,
// and gets full checksums.
const (
	txOffloadTCP = 1 << 31
	txOffloadV6  = 1 << 16
	txOffloadMSS = 1<<16 - 1
)

// rxOffloadAccept is what a client writes on the peer socket to take
// checksum offload (RxGSO).
const rxOffloadAccept = 'C'

// encodeTxOffload is the meta word of a super-packet of gso.
func encodeTxOffload(gso *stack.GSO) uint32 {
	m := uint32(txOffloadTCP) | uint32(gso.MSS)
	if gso.Type == stack.GSOTCPv6 {
		m |= txOffloadV6
	}
	return m
}

// decodeTxOffload checks a meta word from the peer and returns the MSS and
// IP version it flags.
func decodeTxOffload(m uint32) (mss uint16, v6 bool, err error) {
	if m&txOffloadTCP == 0 || m&^(txOffloadTCP|txOffloadV6|txOffloadMSS) != 0 || m&txOffloadMSS == 0 {
		return 0, false, fmt.Errorf("%w: TX meta word %#08x is not a TCP segmentation offload", queue.ErrViolation, m)
	}
	return uint16(m & txOffloadMSS), m&txOffloadV6 != 0, nil
}

// completeTCPChecksum completes, in place, the partial checksum of a TCP
// packet its stack built for host GSO: the checksum field holds the
// pseudo-header sum, so summing the header and payload over it gives the
// checksum.
func completeTCPChecksum(pkt *stack.PacketBuffer) {
	t := header.TCP(pkt.TransportHeader().Slice())
	if len(t) < header.TCPMinimumSize {
		return
	}
	t.SetChecksum(^checksum.Checksum(t, pkt.Data().Checksum()))
}

// offloadFrame checks the frame v of size bytes (v may hold only its head:
// direct.go), flagged by meta, for delivery as a TCP super-packet and
// returns its MSS and its length without link-layer padding (v is trimmed
// to it when whole); n is 0 for a frame to drop. err is a protocol
// violation.
func offloadFrame(v *buffer.View, size int, ethernet bool, meta uint32) (mss uint16, n int, err error) {
	mss, v6, err := decodeTxOffload(meta)
	if err != nil {
		return 0, 0, err
	}
	_, n, perr := endpoint.ParseTCPHead(v.AsSlice(), size, ethernet, v6)
	if perr != nil {
		return 0, 0, nil
	}
	if v.Size() == size {
		v.CapLength(n) // link-layer padding
	}
	return mss, n, nil
}
