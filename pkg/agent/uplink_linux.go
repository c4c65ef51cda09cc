package agent

import (
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// quiesceUplink sets the router's uplink device down in the host namespace
// before the router closes, so that the host stops sending into it.
//
// Why: the router's uplink endpoint (gVisor's fdbased) waits for its reader
// in Attach(nil), which stack.RemoveNIC calls with the stack's lock held;
// a packet the reader is delivering at that moment needs that lock (IPv4
// HandlePacket looks up the NIC name for the nftables hook), so Close
// deadlocks. Host packets arrive at any time (IPv6 router solicitations,
// MLD reports, the last ACKs of a connection). With the device down nothing
// new arrives. The router's own fix is to drive the uplink with
// endpoint.NewTAP, whose Attach(nil) does not wait.
func quiesceUplink(host ns.NetNS, name string) error {
	h, err := netlink.NewHandleAt(netns.NsHandle(host.Fd()))
	if err != nil {
		return fmt.Errorf("quiesce uplink %s: %w", name, err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("quiesce uplink %s: %w", name, err)
	}
	if err := h.LinkSetDown(l); err != nil {
		return fmt.Errorf("quiesce uplink %s: %w", name, err)
	}
	return nil
}
