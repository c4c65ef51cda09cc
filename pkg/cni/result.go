package cni

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/shm-cni/shm-cni/internal/untrusted"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// The link-local gateways the agent answers on every pod link, used when
// its answer names none (they are the router's GatewayV4 and GatewayV6).
var (
	DefaultGatewayV4 = netip.MustParseAddr("169.254.1.1")
	DefaultGatewayV6 = netip.MustParseAddr("fe80::1")
)

// attachment is the agent's attach answer, parsed and completed with
// defaults.
type attachment struct {
	// Addrs are the pod's addresses as host prefixes (/32, /128); Gws
	// their gateways, index for index.
	Addrs []netip.Prefix
	Gws   []netip.Addr
	// Routes are the routes through the pod's interface: the agent's, or
	// a default route per address family via that family's gateway.
	Routes []podRoute
	MTU    int
	// MAC is the pod-side MAC of a shm link (nil: the kernel picks).
	MAC net.HardwareAddr
	// GatewayMAC answers for the gateways (nil: no static neighbours).
	GatewayMAC net.HardwareAddr
	SocketPath string
}

// parseAttach checks the agent's answer. Addresses are reported and
// configured as host prefixes whatever prefix length the answer gives: the
// pod reaches everything, its own subnet included, through the gateway.
// Errors have agentapi.CodeBadAgentAnswer.
func parseAttach(r *agentapi.AttachResponse, kind string, defaultMTU int) (*attachment, error) {
	bad := func(format string, args ...any) error {
		return newError(agentapi.CodeBadAgentAnswer, "unusable agent answer: "+format, args...)
	}
	if len(r.IPs) == 0 {
		return nil, bad("no addresses")
	}
	at := &attachment{MTU: r.MTU, SocketPath: r.SocketPath}
	if at.MTU == 0 {
		at.MTU = defaultMTU
	}
	if err := linkspec.CheckMTU(at.MTU, linkspec.MinMTU); err != nil {
		return nil, bad("mtu %v", err)
	}
	firstGW := map[bool]netip.Addr{} // by Is4
	for i, ipc := range r.IPs {
		addr, err := parseAddr(ipc.Address)
		if err != nil {
			return nil, bad("ips[%d].address: %v", i, err)
		}
		if slices.ContainsFunc(at.Addrs, func(p netip.Prefix) bool { return p.Addr() == addr }) {
			return nil, bad("ips[%d].address: %s repeats", i, addr)
		}
		gw := DefaultGatewayV4
		if addr.Is6() {
			gw = DefaultGatewayV6
		}
		if ipc.Gateway != "" {
			if gw, err = netip.ParseAddr(ipc.Gateway); err != nil || gw.Is4() != addr.Is4() || gw.Zone() != "" {
				return nil, bad("ips[%d].gateway: %s is not an address of the family of %s", i, untrusted.Quote(ipc.Gateway), addr)
			}
		}
		at.Addrs = append(at.Addrs, netip.PrefixFrom(addr, addr.BitLen()))
		at.Gws = append(at.Gws, gw)
		if _, ok := firstGW[addr.Is4()]; !ok {
			firstGW[addr.Is4()] = gw
		}
	}
	for i, rt := range r.Routes {
		dst, err := netip.ParsePrefix(rt.Dst)
		if err != nil || dst.Addr().Zone() != "" {
			return nil, bad("routes[%d].dst: %s is not a CIDR", i, untrusted.Quote(rt.Dst))
		}
		pr := podRoute{Dst: dst.Masked(), MTU: rt.MTU}
		if rt.GW != "" {
			if pr.GW, err = netip.ParseAddr(rt.GW); err != nil || pr.GW.Is4() != dst.Addr().Is4() || pr.GW.Zone() != "" {
				return nil, bad("routes[%d].gw: %s is not an address of the family of %s", i, untrusted.Quote(rt.GW), dst)
			}
		}
		if rt.MTU < 0 || rt.MTU > 65535 {
			return nil, bad("routes[%d].mtu: %d", i, rt.MTU)
		}
		at.Routes = append(at.Routes, pr)
	}
	if len(r.Routes) == 0 {
		for _, is4 := range []bool{true, false} {
			gw, ok := firstGW[is4]
			if !ok {
				continue
			}
			dst := netip.PrefixFrom(netip.IPv6Unspecified(), 0)
			if is4 {
				dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
			}
			at.Routes = append(at.Routes, podRoute{Dst: dst, GW: gw})
		}
	}
	var err error
	if r.MAC != "" {
		if at.MAC, err = parseMAC(r.MAC); err != nil {
			return nil, bad("mac: %v", err)
		}
	}
	gwMAC := r.GatewayMAC
	if gwMAC == "" && kind == KindTap {
		// For a tap link, MAC is the agent's side of the link.
		gwMAC = r.MAC
	}
	if gwMAC != "" {
		if at.GatewayMAC, err = parseMAC(gwMAC); err != nil {
			return nil, bad("gatewayMAC: %v", err)
		}
	}
	if kind == KindTap || kind == KindVeth {
		// The MAC of a tap or veth link's pod side is the device's own.
		at.MAC = nil
	}
	if kind == KindShm && (!filepath.IsAbs(at.SocketPath) || len(at.SocketPath) > maxSocketPath) {
		return nil, bad("socketPath: %s is not an absolute unix socket path", untrusted.Quote(at.SocketPath))
	}
	return at, nil
}

// linkConfig returns what the pod's interface gets.
func (at *attachment) linkConfig() linkConfig {
	lc := linkConfig{MTU: at.MTU, Addrs: at.Addrs, Routes: at.Routes, GatewayMAC: at.GatewayMAC}
	for _, gw := range at.Gws {
		if !slices.Contains(lc.Gateways, gw) {
			lc.Gateways = append(lc.Gateways, gw)
		}
	}
	for _, r := range at.Routes {
		if r.GW.IsValid() && !slices.Contains(lc.Gateways, r.GW) {
			lc.Gateways = append(lc.Gateways, r.GW)
		}
	}
	return lc
}

// buildResult returns prev (the previous plugin's result, or nil) with the
// pod's interface, its addresses and routes added.
func buildResult(cniVersion string, prev types.Result, iface *types100.Interface, at *attachment) (*types100.Result, error) {
	res := &types100.Result{CNIVersion: types100.ImplementedSpecVersion}
	if prev != nil {
		r, err := types100.NewResultFromResult(prev)
		if err != nil {
			return nil, newError(agentapi.CodeDecodingFailure, "prevResult: cannot convert to %s: %v", cniVersion, err)
		}
		// The result goes to the runtime with prev's entries: each must
		// print as something the runtime can parse again.
		for i, ip := range r.IPs {
			if ip == nil {
				continue
			}
			if _, ok := prefixOf(&ip.Address); !ok {
				return nil, newError(agentapi.CodeDecodingFailure, "prevResult: ips[%d].address: not a CIDR", i)
			}
		}
		for i, rt := range r.Routes {
			if rt == nil {
				continue
			}
			if _, ok := prefixOf(&rt.Dst); !ok {
				return nil, newError(agentapi.CodeDecodingFailure, "prevResult: routes[%d].dst: not a CIDR", i)
			}
		}
		res = r
	}
	res.Interfaces = append(res.Interfaces, iface)
	idx := len(res.Interfaces) - 1
	for i, a := range at.Addrs {
		res.IPs = append(res.IPs, &types100.IPConfig{
			Interface: types100.Int(idx),
			Address:   *ipNet(a),
			Gateway:   net.IP(at.Gws[i].AsSlice()),
		})
	}
	for _, r := range at.Routes {
		tr := &types.Route{Dst: *ipNet(r.Dst)}
		if r.GW.IsValid() {
			tr.GW = net.IP(r.GW.AsSlice())
		}
		if r.MTU != 0 {
			tr.MTU = r.MTU
		}
		res.Routes = append(res.Routes, tr)
	}
	return res, nil
}

// parseAddr parses "10.1.2.3/24" or "10.1.2.3" and returns the address.
func parseAddr(s string) (netip.Addr, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		s = p.Addr().String()
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" || a.Is4In6() || !a.IsGlobalUnicast() {
		return netip.Addr{}, fmt.Errorf("%s is not a unicast address", untrusted.Quote(s))
	}
	return a, nil
}

// parseMAC parses a unicast, non-zero Ethernet MAC.
func parseMAC(s string) (net.HardwareAddr, error) {
	hw, err := net.ParseMAC(s)
	switch {
	case err != nil || len(hw) != 6:
		return nil, fmt.Errorf("%s is not a 6-byte MAC address", untrusted.Quote(s))
	case hw[0]&1 != 0:
		return nil, fmt.Errorf("%s is a multicast address", untrusted.Quote(s))
	case string(hw) == "\x00\x00\x00\x00\x00\x00":
		return nil, fmt.Errorf("%s is all zeroes", untrusted.Quote(s))
	}
	return hw, nil
}
