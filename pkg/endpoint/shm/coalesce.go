package shm

import (
	"bytes"
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
)

// Receive offload for a sandbox's TCP segments (GRO).
//
// A sandbox's netstack cuts its TCP stream at the MSS its peer announced: a
// kernel pod or a host beyond the uplink announces 1460 bytes (MTU 1500),
// however large the sandbox link's own MTU. Each such segment crossing the
// router alone costs a stack traversal and, towards a kernel, one write
// system call: 45 of each per 64 KiB, where a kernel pod's TCP hands the
// router one super-packet (pkg/endpoint/gso.go). The router's slow path, which forwards
// everything that leaves the node, went at a tenth of the sandbox-to-kernel
// pod rate.
//
// So a Forwarding shared-memory link joins, within one receive batch,
// consecutive segments of one TCP flow into one super-packet, as a kernel's
// GRO does, and delivers it with the GSO mark of pkg/endpoint/gso.go: the egress link
// writes it whole to a kernel (which segments it, or takes it whole as from
// a veth) or segments it in software. Only what the stream itself would be
// is joined: the frames are private copies (the receive loop copied them out
// of shared memory), and a segment joins a run only if
//   - it is TCP over IPv4 (Don't Fragment set, no options, not a fragment)
//     or IPv6 without extension headers, with a payload;
//   - its TCP checksum is valid (a broken segment is delivered alone, so
//     that its receiver drops it: the re-segmented stream gets fresh
//     checksums);
//   - its flags are ACK, and PSH at most on the run's last segment;
//   - its addresses, ports, IP TOS/traffic class, flow label, TTL/hop
//     limit, acknowledgment number, TCP header length and options equal the
//     run's first segment's, and its sequence number follows the run;
//   - its payload is the size of the run's first segment (a smaller one
//     ends the run), and the run stays within an IP packet (64 KiB).
// The super-packet keeps the first segment's headers with the run's length,
// the last segment's window, PSH if the last had it, a fresh IPv4 header
// checksum and the TCP pseudo-header sum in the checksum field (a partial
// checksum, as a kernel's TSO leaves it). Its MSS is the first segment's
// payload size. Runs are only of adjacent frames, so the order of the
// frames is kept.

// maxCoalesced is the largest IP packet a run may grow to.
const maxCoalesced = 1<<16 - 1

// segment is a frame parsed for coalescing.
type segment struct {
	v       *buffer.View
	f       endpoint.ParsedTCP
	payload int // TCP payload bytes
	seq     uint32
	psh     bool
}

// coalescable parses frame v for joining a run. It reports false for a
// frame to deliver as it is.
func coalescable(v *buffer.View, ethernet bool) (segment, bool) {
	b := v.AsSlice()
	l2 := 0
	if ethernet {
		if len(b) < header.EthernetMinimumSize {
			return segment{}, false
		}
		l2 = header.EthernetMinimumSize
	}
	if len(b) <= l2 {
		return segment{}, false
	}
	var v6 bool
	switch header.IPVersion(b[l2:]) {
	case header.IPv4Version:
	case header.IPv6Version:
		v6 = true
	default:
		return segment{}, false
	}
	f, err := endpoint.ParseTCPFrame(b, ethernet, v6)
	if err != nil || len(f.Frame) != len(b) {
		// Unparsable, or link-layer padding after the IP packet.
		return segment{}, false
	}
	if !v6 {
		h := header.IPv4(f.Frame[l2:])
		if f.L3 != header.IPv4MinimumSize || h.Flags()&header.IPv4FlagDontFragment == 0 {
			return segment{}, false
		}
	}
	t := header.TCP(f.Frame[l2+f.L3:])
	flags := t.Flags()
	if flags&^header.TCPFlagPsh != header.TCPFlagAck {
		return segment{}, false
	}
	payload := len(f.Frame) - f.HeaderLength()
	if payload == 0 {
		return segment{}, false
	}
	return segment{v: v, f: f, payload: payload, seq: t.SequenceNumber(), psh: flags&header.TCPFlagPsh != 0}, true
}

// checksumOK reports whether s's TCP checksum is valid. coalesceRuns asks
// only of a segment about to be part of a run of two or more: a frame
// delivered alone is delivered as it came, and the checksum pass (a read
// of the whole segment) is not spent on the large segments of a stream
// between sandboxes, which never join.
func (s *segment) checksumOK() bool {
	f := &s.f
	tcp := f.Frame[f.L2+f.L3:]
	return checksum.Checksum(tcp, endpoint.PseudoHeaderSum(f, len(tcp))) == 0xffff
}

// follows reports whether s continues the run that starts with first and
// has carried n payload bytes so far.
func follows(first, s *segment, n int) bool {
	a, b := first.f, s.f
	if a.V6 != b.V6 || a.L3 != b.L3 || a.L4 != b.L4 || a.L2 != b.L2 {
		return false
	}
	if s.payload > first.payload || s.seq != first.seq+uint32(n) {
		return false
	}
	if a.L3+a.L4+n+s.payload > maxCoalesced {
		return false
	}
	ipA, ipB := a.Frame[a.L2:], b.Frame[b.L2:]
	if a.V6 {
		// Version, traffic class, flow label; hop limit; addresses.
		if !bytes.Equal(ipA[0:4], ipB[0:4]) || ipA[7] != ipB[7] || !bytes.Equal(ipA[8:40], ipB[8:40]) {
			return false
		}
	} else {
		// TOS; DF (both set); TTL and protocol; addresses.
		if ipA[1] != ipB[1] || ipA[8] != ipB[8] || !bytes.Equal(ipA[12:20], ipB[12:20]) {
			return false
		}
	}
	tA, tB := header.TCP(ipA[a.L3:]), header.TCP(ipB[b.L3:])
	return bytes.Equal(tA[0:4], tB[0:4]) && // ports
		tA.AckNumber() == tB.AckNumber() &&
		bytes.Equal(tA[header.TCPMinimumSize:a.L4], tB[header.TCPMinimumSize:b.L4]) // options
}

// runScratch is the room coalesceRuns keeps a run in: the receive loop's
// own, so that a batch allocates nothing (on the heap, as it must be, since
// deliver is a function value, a run cost an allocation of its full size
// per batch, a tenth of the agent's CPU between two sandboxes).
type runScratch [rxBatch]segment

// coalesceRuns calls deliver once per frame of views, in order, for each
// frame that joins no other, and once per run of at least two, with the run's
// frames (see above), kept in scratch. deliver takes ownership of the views
// it is given.
func coalesceRuns(views []*buffer.View, ethernet bool, scratch *runScratch, deliver func(run []segment, single *buffer.View)) {
	var run []segment
	n := 0    // payload bytes in run
	used := 0 // of scratch, cleared on return (it holds views)
	defer func() { clear(scratch[:used]) }()
	flush := func() {
		switch len(run) {
		case 0:
		case 1:
			deliver(nil, run[0].v)
		default:
			deliver(run, nil)
		}
		used = max(used, len(run))
		run, n = scratch[:0], 0
	}
	run = scratch[:0]
	for _, v := range views {
		s, ok := coalescable(v, ethernet)
		if !ok {
			flush()
			deliver(nil, v)
			continue
		}
		if len(run) > 0 && !follows(&run[0], &s, n) {
			flush()
		}
		if len(run) == 1 && !run[0].checksumOK() {
			flush() // the first alone; s starts a run of its own
		}
		if len(run) > 0 && !s.checksumOK() {
			flush()
			deliver(nil, v)
			continue
		}
		run = append(run, s)
		n += s.payload
		if s.psh || s.payload < run[0].payload {
			flush()
		}
	}
	flush()
}

// joinRun makes the super-packet of run (at least two segments) in place:
// the first segment's view becomes its headers and first payload, the
// others' views are trimmed to their payloads. It returns the views in
// order and the MSS.
func joinRun(run []segment) ([]*buffer.View, uint16) {
	first := &run[0]
	f := first.f
	total := 0
	for i := range run {
		total += run[i].payload
	}
	last := &run[len(run)-1]
	ip := f.Frame[f.L2:]
	tcpLen := f.L4 + total
	if f.V6 {
		binary.BigEndian.PutUint16(ip[4:], uint16(tcpLen))
	} else {
		h := header.IPv4(ip)
		h.SetTotalLength(uint16(f.L3 + tcpLen))
		h.SetChecksum(0)
		h.SetChecksum(^h.CalculateChecksum())
	}
	t := header.TCP(ip[f.L3:])
	lt := header.TCP(last.f.Frame[last.f.L2+last.f.L3:])
	t.SetWindowSize(lt.WindowSize())
	if last.psh {
		t.SetFlags(uint8(header.TCPFlagAck | header.TCPFlagPsh))
	}
	// The partial checksum: the pseudo-header sum over the whole segment,
	// which the kernel (or software segmentation) completes.
	t.SetChecksum(endpoint.PseudoHeaderSum(&f, tcpLen))

	views := make([]*buffer.View, len(run))
	views[0] = first.v
	for i := 1; i < len(run); i++ {
		s := &run[i]
		s.v.TrimFront(s.f.HeaderLength())
		views[i] = s.v
	}
	return views, uint16(first.payload)
}
