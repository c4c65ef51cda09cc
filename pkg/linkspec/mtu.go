package linkspec

import "fmt"

// MTU bounds. An MTU is an IP MTU: the largest IP packet a link carries,
// link-layer header not included.
//
// Two layers use them. The link itself (the TAP and shared-memory
// endpoints, the link config a sandbox dials, the MTU an attach asks for
// and the plugin sets) works with any MTU in MinMTU..MaxMTU. What an
// operator configures for a kind of link is bounded by what both IP
// families need on it: MinShmMTU for sandbox links, MinNodeMTU for the
// kernel links the agent configures node-wide (kernel pods' default, the
// uplink).
const (
	// MaxMTU is the largest IP packet: IPv4's 16-bit total length
	// (and IPv6's payload length plus its header, less than that
	// without jumbograms), 2^16-1 = 65535 bytes.
	MaxMTU = 1<<16 - 1
	// MinMTU is the smallest MTU of any link: IPv4's, 68 bytes (RFC
	// 791: a 60-byte header and an 8-byte fragment pass unfragmented).
	MinMTU = 68
	// MinMTU4 is the datagram every IPv4 host must accept, 576 bytes
	// (RFC 791).
	MinMTU4 = 576
	// MinMTU6 is IPv6's minimum link MTU, 1280 bytes (RFC 8200 section
	// 5); the kernel turns IPv6 off on a smaller link.
	MinMTU6 = 1280
	// MinShmMTU is the smallest configured MTU of a sandbox link (kind
	// shm): MinMTU6, because a sandbox's stack speaks both families
	// whatever the node's.
	MinShmMTU = MinMTU6
	// DefaultShmMTU is the default MTU of sandbox links (the agent's
	// --shm-mtu): a sandbox's userspace TCP sends segments of up to 64
	// KiB over its queue pair, and the router carries them whole between
	// sandboxes (sandbox to sandbox, one stream: 1.45 Gbit/s at MTU 1500,
	// 5.84 at 65000, make bench on the 2-core test machine). 65000 rather
	// than 65535: a frame with its Ethernet header (65014 bytes) stays
	// within gVisor's largest pooled buffer chunk (64 KiB); larger ones
	// are allocated outside the pool for every frame. Links to kernel
	// pods, the host and beyond keep the node's MTU: TCP's MSS keeps
	// segments to their size, and the router answers ICMP "fragmentation
	// needed" or "packet too big" for larger packets that may not be
	// fragmented.
	DefaultShmMTU = 65000
)

// MinNodeMTU is the smallest MTU the agent may be configured with for
// kernel links node-wide (kernel pods' default, the uplink): MinMTU6 when
// the node has IPv6 pod addresses, MinMTU4 otherwise.
func MinNodeMTU(has6 bool) int {
	if has6 {
		return MinMTU6
	}
	return MinMTU4
}

// CheckMTU returns an error unless min <= mtu <= MaxMTU.
func CheckMTU(mtu, min int) error {
	if mtu < min || mtu > MaxMTU {
		return fmt.Errorf("%d is not in %d..%d", mtu, min, MaxMTU)
	}
	return nil
}
