package agent

import (
	"log/slog"
	"net/netip"
	"sync/atomic"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// attachment is a pod's link and its record.
type attachment struct {
	rec  *record      // immutable
	log  *slog.Logger // immutable
	link podLink      // immutable
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
	att.link.stop()
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
