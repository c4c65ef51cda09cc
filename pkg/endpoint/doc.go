// Package endpoint holds what every link endpoint of shm-cni shares, whatever
// its kind: the link framing (Framing: Ethernet or bare IP), the counters
// (Stats), the receive limit a pod's link is held to (RxLimit), and the
// contract for TCP super-packets (GSO) between endpoints and the router.
//
// The endpoints themselves live in one package per link kind, as gVisor's
// own pkg/tcpip/link tree has them:
//
//   - [github.com/shm-cni/shm-cni/pkg/endpoint/shm]: a sandbox's
//     shared-memory queue pair, the agent's Server and the sandbox's Client,
//     and both halves of the dial protocol by which a sandbox gets its link;
//   - [github.com/shm-cni/shm-cni/pkg/endpoint/tap]: a TAP (kernel pod) or
//     TUN (the router's uplink) device driven through its fd, with
//     virtio-net headers.
//
// A new link kind is a new package beside them that frames with Framing,
// counts in Stats, holds its peer to an RxLimiter and honours the GSO
// contract (gso.go): a packet carrying GSO options is written whole to a
// peer that takes super-packets, or cut by SoftwareGSO.
//
// The kernel's TUN/TAP devices themselves (open, inspect) are
// [github.com/shm-cni/shm-cni/pkg/tuntap], which links no netstack.
package endpoint
