package cni

import (
	"fmt"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// Del implements CNI DEL.
//
// DEL is idempotent and best effort: it may be called several times for the
// same attachment, after a failed or partial ADD, with the pod's netns
// already gone, and while the agent is down. Resources that are gone are
// not an error. In order:
//
//  1. the agent detaches the link (detaching an unknown attachment
//     succeeds). When the agent is unreachable (agentapi.CodeTryAgainLater) DEL goes
//     on and succeeds: the agent's state is reconciled later by CNI GC and
//     by the agent's own re-adoption at start, which drops attachments
//     whose interface is gone. Any other agent error fails DEL after the
//     netns cleanup, without releasing the IPAM addresses, since the agent
//     may still route them to this pod; the runtime retries DEL;
//  2. the interface is deleted from the pod's netns, if both still exist
//     (a TAP device or a placeholder), and a veth link's pair through its
//     host side, if it still exists;
//  3. a delegated IPAM plugin releases the addresses.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	c, err := p.begin("DEL", args)
	if err != nil {
		return toCNI(err)
	}
	defer c.end()
	if err := c.del(args); err != nil {
		return c.fail(err)
	}
	return nil
}

func (c *call) del(args *skel.CmdArgs) error {
	conf, log := c.conf, c.log

	agentErr := detach(c.ctx, conf.AgentSocket, args.ContainerID, args.IfName)
	switch {
	case agentErr == nil:
	case codeOf(agentErr) == agentapi.CodeTryAgainLater:
		log.Warn("agent unreachable; DEL goes on, the agent reconciles its attachments later (GC, restart)", "err", agentErr)
		agentErr = nil
	default:
		log.Error("agent detach failed", "err", agentErr)
	}

	what, err := deleteLink(args.Netns, args.IfName)
	if err != nil {
		return fmt.Errorf("delete %s in %s: %w", args.IfName, args.Netns, err)
	}
	log.Debug("pod interface", "outcome", what)
	// A veth link's pair and ifb device, whatever kind the pod asks for
	// now: the agent deletes them on detach, but not while it is down.
	if err := deleteHostVeth(linkspec.Key{ContainerID: args.ContainerID, IfName: args.IfName}); err != nil {
		return fmt.Errorf("veth link: %w", linkErr(err))
	}

	if agentErr != nil {
		return fmt.Errorf("detach %s/%s: %w", args.ContainerID, args.IfName, agentErr)
	}
	if conf.DelegatesIPAM() {
		if err := invoke.DelegateDel(c.ctx, conf.IPAM.Type, args.StdinData, nil); err != nil {
			return fmt.Errorf("ipam %s DEL: %w", conf.IPAM.Type, err)
		}
	}
	log.Info("deleted")
	return nil
}
