package cni

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/shm-cni/shm-cni/internal/untrusted"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// Check implements CNI CHECK: the interface of prevResult exists in the pod
// netns with its MAC, MTU, addresses and routes, the agent has the
// attachment with those addresses and the bandwidth limit of the runtime
// config (none when it has none), and a delegated IPAM plugin agrees.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	c, err := p.begin("CHECK", args)
	if err != nil {
		return toCNI(err)
	}
	defer c.end()
	if err := c.check(args); err != nil {
		return c.fail(err)
	}
	return nil
}

func (c *call) check(args *skel.CmdArgs) error {
	conf := c.conf
	podArgs, err := ParsePodArgs(args.Args)
	if err != nil {
		return err
	}
	kind, err := conf.PodKind(podArgs)
	if err != nil {
		return err
	}
	bandwidth, err := conf.PodBandwidth()
	if err != nil {
		return err
	}
	if bandwidth == nil {
		bandwidth = &linkspec.Bandwidth{} // the pod must have no limit
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return newError(agentapi.CodeDecodingFailure, "prevResult: %v", err)
	}
	if conf.PrevResult == nil {
		return newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: prevResult: required for CHECK")
	}
	prev, err := types100.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return newError(agentapi.CodeDecodingFailure, "prevResult: %v", err)
	}
	want, err := expectedLink(prev, args.IfName, args.Netns)
	if err != nil {
		return err
	}

	netns, err := openNetNS(args.Netns)
	if err != nil {
		return err
	}
	defer netns.Close()
	got, err := inspectLink(netns, args.IfName)
	if err != nil {
		return err
	}
	if err := compareLink(kind, want, got); err != nil {
		return err
	}

	ips := make([]string, 0, len(want.Addrs))
	for _, a := range want.Addrs {
		ips = append(ips, a.String())
	}
	_, err = agentapi.Call(c.ctx, conf.AgentSocket, &agentapi.Request{
		Op:    agentapi.OpCheck,
		Check: &agentapi.CheckRequest{ContainerID: args.ContainerID, IfName: args.IfName, IPs: ips, Bandwidth: bandwidth},
	}, nil)
	if err != nil {
		return fmt.Errorf("agent check %s/%s: %w", args.ContainerID, args.IfName, err)
	}
	if conf.DelegatesIPAM() {
		if err := invoke.DelegateCheck(c.ctx, conf.IPAM.Type, args.StdinData, nil); err != nil {
			return fmt.Errorf("ipam %s CHECK: %w", conf.IPAM.Type, err)
		}
	}
	c.log.Debug("checked")
	return nil
}

// wantLink is what prevResult says about the pod's interface.
type wantLink struct {
	MAC    net.HardwareAddr // nil: not checked
	MTU    int              // 0: not checked
	Addrs  []netip.Prefix
	Routes []podRoute
	// Alias is a shm link's placeholder alias, from the result's
	// socketPath; empty: not checked.
	Alias string
}

// expectedLink finds ifName in netns among prev's interfaces and collects
// its addresses. Routes are attributed to the interface when it is the
// only one in a sandbox, or their gateway is one of its addresses'.
func expectedLink(prev *types100.Result, ifName, netns string) (*wantLink, error) {
	idx := -1
	for i, iface := range prev.Interfaces {
		if iface != nil && iface.Name == ifName && iface.Sandbox == netns {
			idx = i
		}
	}
	if idx < 0 {
		return nil, newError(agentapi.CodeCheckFailed, "CHECK: prevResult has no interface %s in sandbox %s", untrusted.Quote(ifName), untrusted.Quote(netns))
	}
	iface := prev.Interfaces[idx]
	w := &wantLink{MTU: iface.Mtu}
	if iface.SocketPath != "" {
		w.Alias = AttachSocketAliasPrefix + iface.SocketPath
	}
	if iface.Mac != "" {
		mac, err := net.ParseMAC(iface.Mac)
		if err != nil {
			return nil, newError(agentapi.CodeDecodingFailure, "prevResult: interfaces[%d].mac: %s is not a MAC address", idx, untrusted.Quote(iface.Mac))
		}
		w.MAC = mac
	}
	var gws []netip.Addr
	for i, ip := range prev.IPs {
		if ip == nil {
			return nil, newError(agentapi.CodeDecodingFailure, "prevResult: ips[%d]: null", i)
		}
		if ip.Interface == nil || *ip.Interface != idx {
			continue
		}
		p, ok := prefixOf(&ip.Address)
		if !ok {
			return nil, newError(agentapi.CodeDecodingFailure, "prevResult: ips[%d].address: not a CIDR", i)
		}
		w.Addrs = append(w.Addrs, p)
		if gw, ok := netip.AddrFromSlice(ip.Gateway); ok {
			gws = append(gws, gw.Unmap())
		}
	}
	if len(w.Addrs) == 0 {
		return nil, newError(agentapi.CodeCheckFailed, "CHECK: prevResult has no address for interface %s", untrusted.Quote(ifName))
	}
	for i, r := range prev.Routes {
		if r == nil {
			return nil, newError(agentapi.CodeDecodingFailure, "prevResult: routes[%d]: null", i)
		}
		dst, ok := prefixOf(&r.Dst)
		if !ok {
			return nil, newError(agentapi.CodeDecodingFailure, "prevResult: routes[%d].dst: not a CIDR", i)
		}
		gw, _ := netip.AddrFromSlice(r.GW)
		gw = gw.Unmap()
		if slices.Contains(gws, gw) {
			w.Routes = append(w.Routes, podRoute{Dst: dst.Masked(), GW: gw})
		}
	}
	return w, nil
}

// compareLink reports every difference between want and got.
func compareLink(kind string, want *wantLink, got *linkState) error {
	var errs []error
	if !kindMakes(kind, got.Type) {
		errs = append(errs, fmt.Errorf("type is %s, not what kind %s creates", got.Type, kind))
	}
	if want.MAC != nil && !bytes.Equal(want.MAC, got.MAC) {
		errs = append(errs, fmt.Errorf("mac is %s, want %s", got.MAC, want.MAC))
	}
	if want.Alias != "" && want.Alias != got.Alias {
		errs = append(errs, fmt.Errorf("alias is %q, want %q", got.Alias, want.Alias))
	}
	if want.MTU != 0 && want.MTU != got.MTU {
		errs = append(errs, fmt.Errorf("mtu is %d, want %d", got.MTU, want.MTU))
	}
	if !got.Up {
		errs = append(errs, errors.New("link is down"))
	}
	for _, a := range want.Addrs {
		if !slices.Contains(got.Addrs, a) {
			errs = append(errs, fmt.Errorf("address %s missing", a))
		}
	}
	for _, r := range want.Routes {
		if !slices.ContainsFunc(got.Routes, func(g podRoute) bool { return g.Dst == r.Dst && g.GW == r.GW }) {
			errs = append(errs, fmt.Errorf("route %s via %s missing", r.Dst, r.GW))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	var b bytes.Buffer
	for i, e := range errs {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(e.Error())
	}
	return newError(agentapi.CodeCheckFailed, "CHECK: interface not as in prevResult: %s", b.String())
}

// kindMakes reports whether an interface of type typ is what ADD makes for
// kind: a TAP device for a tap link, a veth for a veth link, and for a shm
// link's placeholder a dummy, or a TAP where the kernel has no dummy
// devices.
func kindMakes(kind, typ string) bool {
	switch kind {
	case KindTap:
		return typ == linkTypeTAP
	case KindVeth:
		return typ == linkTypeVeth
	}
	return typ == linkTypeDummy || typ == linkTypeTAP
}
