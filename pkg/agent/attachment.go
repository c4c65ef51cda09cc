package agent

import (
	"encoding/binary"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/endpoint/shm"
	"github.com/shm-cni/shm-cni/pkg/endpoint/tap"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// attachment is a live pod link.
type attachment struct {
	rec    *record        // immutable
	linkID string         // the router link's id; immutable
	router *router.Router // immutable
	log    *slog.Logger   // immutable

	// tap is a tap link's endpoint; nil for shm and for a tap link that
	// could not be re-adopted. Immutable.
	tap *tap.Endpoint
	// tapGone is set when the TAP device went away under the endpoint.
	tapGone atomic.Bool
	// shm is a shm link's sandbox server; nil for tap. Immutable.
	shm *shmLink
	// stopped is set once stop ran.
	stopped atomic.Bool
}

// stop removes the link from the router and releases the attachment's
// descriptors and socket. It keeps the record and the addresses. It must be
// called with the agent's opMu held (or by the only owner of att).
func (att *attachment) stop() {
	if att.stopped.Swap(true) {
		return
	}
	if att.shm != nil {
		att.shm.stop()
		return
	}
	// RemoveLink closes the TAP endpoint and with it the TAP fd.
	if err := att.router.RemoveLink(att.linkID); err != nil {
		att.log.Warn("remove link", "err", err)
	}
}

// endpointStats returns the counters of the attachment's current endpoint,
// if it has one.
func (att *attachment) endpointStats() (endpoint.StatsSnapshot, bool) {
	switch {
	case att.tap != nil:
		return att.tap.Stats().Snapshot(), true
	case att.shm != nil:
		return att.shm.stats()
	}
	return endpoint.StatsSnapshot{}, false
}

// podMACFor derives a shm link's pod MAC from its first address: 02:53
// (locally administered unicast, 'S') then the address's last four bytes.
// Every pod link is its own L2 segment with the router, so the MAC only has
// to differ from GatewayMAC, which the 02 prefix guarantees.
func podMACFor(addrs []netip.Addr) tcpip.LinkAddress {
	mac := make(net.HardwareAddr, 6)
	mac[0], mac[1] = 0x02, 0x53
	if len(addrs) > 0 {
		b := addrs[0].AsSlice()
		binary.BigEndian.PutUint32(mac[2:], binary.BigEndian.Uint32(b[len(b)-4:]))
	}
	return tcpip.LinkAddress(mac)
}

// ipConfigs returns the addresses and default routes the agent answers for
// addrs: /32 and /128 behind the link-local gateways.
func ipConfigs(addrs []netip.Addr) ([]agentapi.IPConfig, []agentapi.Route) {
	var ips []agentapi.IPConfig
	var routes []agentapi.Route
	for _, a := range addrs {
		gw, dst := router.GatewayV6, "::/0"
		if a.Is4() {
			gw, dst = router.GatewayV4, "0.0.0.0/0"
		}
		ips = append(ips, agentapi.IPConfig{Address: netip.PrefixFrom(a, a.BitLen()).String(), Gateway: gw.String()})
		routes = append(routes, agentapi.Route{Dst: dst, GW: gw.String()})
	}
	return ips, routes
}

// linkConfigFor is what a sandbox gets for rec.
func linkConfigFor(rec *record) shm.LinkConfig {
	c := shm.LinkConfig{
		Version:    shm.LinkConfigVersion,
		MAC:        rec.PodMAC,
		GatewayMAC: net.HardwareAddr(GatewayMAC).String(),
		MTU:        uint32(rec.MTU),
	}
	if rec.Queue != nil {
		c.BufferSize = rec.Queue.BufferSize
	}
	for _, a := range rec.Addrs {
		gw, dst := router.GatewayV6, netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		if a.Is4() {
			gw, dst = router.GatewayV4, netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		}
		c.Addresses = append(c.Addresses, netip.PrefixFrom(a, a.BitLen()))
		c.Routes = append(c.Routes, shm.LinkRoute{Dst: dst, GW: gw})
		c.Gateways = append(c.Gateways, gw)
	}
	return c
}
