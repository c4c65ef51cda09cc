// Package tap drives a kernel TUN or TAP device through its fd as a gVisor
// link endpoint: a kernel pod's TAP link and the router's uplink TUN device.
//
// New takes an fd from tuntap.Open (or received over SCM_RIGHTS) and checks
// it against Options. The files follow a frame:
//
//   - tap.go: options, the Endpoint, its capabilities and lifecycle (Attach
//     starts the reader, Attach(nil) stops it, Close, Wait);
//   - receive.go: the reader, from a read to the packet delivered to the
//     stack (super-packets segmented or passed whole, the receive limit);
//   - transmit.go: WritePackets, one writev per frame with its virtio-net
//     header, or software segmentation where the device takes no GSO;
//   - vnet.go: the virtio-net header and what the kernel hands over with
//     it, on plain bytes (unit-tested and fuzzed without privileges);
//   - tap_linux.go, tap_unsafe.go: the fd, reads and writes.
//
// With a virtio-net header, the kernel's TCP super-packets are segmented (or,
// on a Forwarding endpoint, delivered whole under the GSO contract of
// package endpoint) and partial checksums completed, so every packet handed
// to the stack carries valid checksums.
package tap
