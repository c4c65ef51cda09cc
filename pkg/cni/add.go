package cni

import (
	"context"
	"fmt"
	"os"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// Add implements CNI ADD: it creates the pod's link (a TAP device in the pod
// netns, a veth pair, or a shared-memory queue pair), hands it to the agent, configures
// the pod netns from the agent's answer and prints the result. Any failure
// undoes everything done before it.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	c, err := p.begin("ADD", args)
	if err != nil {
		return toCNI(err)
	}
	defer c.end()
	res, err := c.add(args)
	if err != nil {
		return c.fail(err)
	}
	out, err := res.GetAsVersion(c.conf.CNIVersion)
	if err == nil {
		err = out.PrintTo(p.stdout())
	}
	if err != nil {
		// The runtime will not see the result and will call DEL.
		return c.fail(newError(types.ErrIOFailure, "print result: %v", err))
	}
	return nil
}

func (c *call) add(args *skel.CmdArgs) (*types100.Result, error) {
	// Parse: everything that can be refused is refused before anything is
	// created.
	conf, log := c.conf, c.log
	podArgs, err := ParsePodArgs(args.Args)
	if err != nil {
		return nil, err
	}
	kind, err := conf.PodKind(podArgs)
	if err != nil {
		return nil, err
	}
	bandwidth, err := conf.PodBandwidth()
	if err != nil {
		return nil, err
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, newError(agentapi.CodeDecodingFailure, "prevResult: %v", err)
	}
	netns, err := openNetNS(args.Netns)
	if err != nil {
		return nil, err
	}
	defer netns.Close()
	log = log.With("kind", kind)
	log.Debug("adding")

	success := false
	rollbackCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(c.ctx), cleanupTimeout)
	}

	// IPAM: a delegated plugin's addresses go to the agent; without one
	// the agent allocates. A delegation runs within the command's
	// deadline (here and in DEL, CHECK, STATUS and GC), its rollback
	// within cleanupTimeout.
	var ipamIPs []string
	if conf.DelegatesIPAM() {
		r, err := invoke.DelegateAdd(c.ctx, conf.IPAM.Type, args.StdinData, nil)
		if err != nil {
			return nil, fmt.Errorf("ipam %s ADD: %w", conf.IPAM.Type, err)
		}
		defer func() {
			if !success {
				ctx, cancel := rollbackCtx()
				defer cancel()
				if err := invoke.DelegateDel(ctx, conf.IPAM.Type, args.StdinData, nil); err != nil {
					log.Warn("rollback: ipam DEL failed", "ipam", conf.IPAM.Type, "err", err)
				}
			}
		}()
		if ipamIPs, err = ipamAddresses(r); err != nil {
			return nil, fmt.Errorf("ipam %s ADD: %w", conf.IPAM.Type, err)
		}
	}

	// Netns work and the link's resources.
	req := &agentapi.AttachRequest{
		ContainerID:  args.ContainerID,
		IfName:       args.IfName,
		Netns:        args.Netns,
		Network:      conf.Name,
		Kind:         kind,
		MTU:          conf.linkMTU(kind),
		IPs:          ipamIPs,
		PodNamespace: string(podArgs.K8S_POD_NAMESPACE),
		PodName:      string(podArgs.K8S_POD_NAME),
		Bandwidth:    bandwidth,
	}
	var (
		tap  *os.File
		pod  *podIface
		pair queue.Pair
	)
	switch kind {
	case KindTap:
		if tap, pod, err = createTAP(netns, args.IfName, conf.tapGSOMaxSize()); err != nil {
			return nil, err
		}
		defer pod.Close()
		// Our fd only; the agent keeps its own duplicate.
		defer tap.Close()
		defer func() {
			if !success {
				if what, err := deleteLink(args.Netns, args.IfName); err != nil {
					log.Warn("rollback: delete tap failed", "err", err)
				} else {
					log.Debug("rollback: tap", "outcome", what)
				}
			}
		}()
		req.MAC = pod.link.Attrs().HardwareAddr.String()
	case KindVeth:
		if pod, err = openPodIface(netns, args.IfName); err != nil {
			return nil, err
		}
		defer pod.Close()
		hostName := linkspec.HostVethName(req.Key())
		if err := pod.createVeth(netns, hostName); err != nil {
			return nil, err
		}
		defer func() {
			if !success {
				if err := deleteHostVeth(req.Key()); err != nil {
					log.Warn("rollback: delete veth failed", "err", err)
				}
			}
		}()
		req.MAC = pod.link.Attrs().HardwareAddr.String()
	case KindShm:
		if pod, err = openPodIface(netns, args.IfName); err != nil {
			return nil, err
		}
		defer pod.Close()
		if pair, err = queue.NewPair(conf.Queue); err != nil {
			return nil, fmt.Errorf("create queue pair: %w", err)
		}
		req.Queue = &agentapi.QueueSizes{DataSize: conf.Queue.DataSize, PipeSize: conf.Queue.PipeSize, BufferSize: conf.Queue.BufferSize}
	}

	// Agent.
	var resp *agentapi.Response
	call := func(fds []int) error {
		var err error
		resp, err = agentapi.Call(c.ctx, conf.AgentSocket, &agentapi.Request{Op: agentapi.OpAttach, Attach: req}, fds)
		return err
	}
	switch kind {
	case KindTap:
		err = withFD(tap, func(fd int) error { return call([]int{fd}) })
	case KindVeth:
		err = call(nil)
	default:
		err = call(pair.FDs())
		// The agent has its duplicates (or nothing): ours go now.
		if cerr := pair.Close(); cerr != nil {
			log.Warn("close queue pair", "err", cerr)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s/%s: %w", args.ContainerID, args.IfName, err)
	}
	defer func() {
		if !success {
			ctx, cancel := rollbackCtx()
			defer cancel()
			if err := detach(ctx, conf.AgentSocket, args.ContainerID, args.IfName); err != nil {
				log.Warn("rollback: agent detach failed", "err", err)
			}
		}
	}()
	at, err := parseAttach(resp.Attach, kind, conf.MTU)
	if err != nil {
		return nil, err
	}

	// Pod netns configuration from the answer.
	iface := &types100.Interface{Name: args.IfName, Sandbox: args.Netns, Mtu: at.MTU}
	switch kind {
	case KindTap, KindVeth:
		iface.Mac = pod.link.Attrs().HardwareAddr.String()
	case KindShm:
		if err := pod.createPlaceholder(netns, at.MAC, at.MTU, at.SocketPath); err != nil {
			return nil, err
		}
		defer func() {
			if !success {
				if _, err := deleteLink(args.Netns, args.IfName); err != nil {
					log.Warn("rollback: delete placeholder failed", "err", err)
				}
			}
		}()
		iface.Mac = pod.link.Attrs().HardwareAddr.String()
		iface.SocketPath = at.SocketPath
	}
	if err := pod.configure(at.linkConfig()); err != nil {
		return nil, err
	}

	// Result.
	res, err := buildResult(conf.CNIVersion, conf.PrevResult, iface, at)
	if err != nil {
		return nil, err
	}
	success = true
	log.Info("added", "mac", iface.Mac, "addrs", at.Addrs, "mtu", at.MTU)
	return res, nil
}

// withFD runs f with f's descriptor, keeping the file open meanwhile.
func withFD(file *os.File, f func(fd int) error) error {
	rc, err := file.SyscallConn()
	if err != nil {
		return fmt.Errorf("fd of %s: %w", file.Name(), err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return fmt.Errorf("fd of %s: %w", file.Name(), err)
	}
	return ferr
}

// ipamAddresses returns the CIDRs of a delegated IPAM plugin's result.
func ipamAddresses(r types.Result) ([]string, error) {
	res, err := types100.NewResultFromResult(r)
	if err != nil {
		return nil, fmt.Errorf("convert result: %w", err)
	}
	if len(res.IPs) == 0 {
		return nil, fmt.Errorf("result has no addresses")
	}
	out := make([]string, 0, len(res.IPs))
	for i, ip := range res.IPs {
		if ip == nil {
			return nil, fmt.Errorf("result ips[%d] is null", i)
		}
		out = append(out, ip.Address.String())
	}
	return out, nil
}

// detach asks the agent to remove an attachment; removing one that does
// not exist succeeds.
func detach(ctx context.Context, socket, containerID, ifName string) error {
	_, err := agentapi.Call(ctx, socket, &agentapi.Request{
		Op:     agentapi.OpDetach,
		Detach: &agentapi.DetachRequest{ContainerID: containerID, IfName: ifName},
	}, nil)
	return err
}
