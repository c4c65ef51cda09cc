package cni

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// Status implements CNI STATUS: it succeeds when the agent answers that it
// is ready (and a delegated IPAM plugin's STATUS succeeds); an unreachable
// or unready agent is agentapi.CodeNotAvailable (50).
func (p *Plugin) Status(args *skel.CmdArgs) error {
	c, err := p.begin("STATUS", args)
	if err != nil {
		return toCNI(err)
	}
	defer c.end()
	if err := c.status(args); err != nil {
		return c.fail(err)
	}
	return nil
}

func (c *call) status(args *skel.CmdArgs) error {
	conf := c.conf
	resp, err := agentapi.Call(c.ctx, conf.AgentSocket, &agentapi.Request{Op: agentapi.OpStatus}, nil)
	if err != nil {
		return newError(agentapi.CodeNotAvailable, "shm-agent not available: %v", err)
	}
	if !resp.Status.Ready {
		return newError(agentapi.CodeNotAvailable, "shm-agent not ready: %s", resp.Status.Reason)
	}
	if conf.DelegatesIPAM() {
		if err := invoke.DelegateStatus(c.ctx, conf.IPAM.Type, args.StdinData, nil); err != nil {
			return fmt.Errorf("ipam %s STATUS: %w", conf.IPAM.Type, err)
		}
	}
	c.log.Debug("ready", "attachments", resp.Status.Attachments)
	return nil
}

// GC implements CNI GC: the agent releases every attachment (and its
// addresses) not in cni.dev/valid-attachments, and a delegated IPAM plugin
// gets the GC too. Both run even when the other fails; the errors are
// joined, the agent's first.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	c, err := p.begin("GC", args)
	if err != nil {
		return toCNI(err)
	}
	defer c.end()
	if err := c.gc(args); err != nil {
		return c.fail(err)
	}
	return nil
}

func (c *call) gc(args *skel.CmdArgs) error {
	conf := c.conf
	valid := make([]agentapi.Attachment, 0, len(conf.ValidAttachments))
	for _, a := range conf.ValidAttachments {
		valid = append(valid, agentapi.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	var errs []error
	resp, err := agentapi.Call(c.ctx, conf.AgentSocket, &agentapi.Request{Op: agentapi.OpGC, GC: &agentapi.GCRequest{Valid: valid}}, nil)
	if err != nil {
		errs = append(errs, fmt.Errorf("agent gc: %w", err))
	} else {
		for _, a := range resp.GC.Released {
			c.log.Info("released stale attachment", "staleContainerID", a.ContainerID, "staleIfName", a.IfName)
		}
	}
	if conf.DelegatesIPAM() {
		if err := invoke.DelegateGC(c.ctx, conf.IPAM.Type, args.StdinData, nil); err != nil {
			errs = append(errs, fmt.Errorf("ipam %s GC: %w", conf.IPAM.Type, err))
		}
	}
	return errors.Join(errs...)
}
