package router

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
)

// What the router keeps on the host beyond its uplink, and checks again
// every Config.HostCheckInterval, because other programs change the host
// too (a firewall reload flushes rules, Docker's start inserts its own
// ahead of ours, an administrator turns forwarding off):
//
//   - the accepts of the host's forward path (hostfw_linux.go);
//   - the masquerade table (masq_linux.go);
//   - IP forwarding, which the router only reads (or, with
//     Config.IPForward, turns on at Start): pod traffic leaving the node
//     arrives on the uplink, so IPv4 needs forwarding there
//     (net.ipv4.ip_forward turns it on everywhere), IPv6 needs
//     net.ipv6.conf.all.forwarding. Off is logged loudly, on every change.

// hostState is the last forwarding state read, for logging changes.
type hostState struct {
	checked    bool
	fwd4, fwd6 bool
}

// sysctlPath returns the /proc/sys file of a sysctl given as its path
// components (an interface name may hold dots, so no dotted names).
func sysctlPath(parts ...string) string {
	return filepath.Join(append([]string{"/proc/sys/net"}, parts...)...)
}

// readForwarding reads, in the host namespace, whether each family of the
// pod CIDRs is forwarded; a family without a pod CIDR reads as true.
func (r *Router) readForwarding() (v4, v6 bool, err error) {
	v4, v6 = true, true
	err = r.hostNS.Do(func(ns.NetNS) error {
		var errs []error
		for _, p := range r.cfg.PodCIDRs {
			path := sysctlPath("ipv6", "conf", "all", "forwarding")
			if p.Addr().Is4() {
				path = sysctlPath("ipv4", "conf", r.cfg.UplinkName, "forwarding")
			}
			b, err := os.ReadFile(path)
			if err != nil {
				errs = append(errs, fmt.Errorf("read forwarding: %w", err))
				continue
			}
			on := strings.TrimSpace(string(b)) != "0"
			if p.Addr().Is4() {
				v4 = on
			} else {
				v6 = on
			}
		}
		return errors.Join(errs...)
	})
	return v4, v6, err
}

// enableForwarding turns the host's forwarding on for every family of the
// pod CIDRs (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding).
func (r *Router) enableForwarding() error {
	return r.hostNS.Do(func(ns.NetNS) error {
		for _, p := range r.cfg.PodCIDRs {
			path := sysctlPath("ipv6", "conf", "all", "forwarding")
			if p.Addr().Is4() {
				path = sysctlPath("ipv4", "ip_forward")
			}
			if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
				return fmt.Errorf("turn forwarding on: %w", err)
			}
		}
		return nil
	})
}

// checkForwardingLocked reads the forwarding state and logs it when it
// changed (at the first check: when it is off).
//
// +checklocks:r.fwMu
func (r *Router) checkForwardingLocked() {
	v4, v6, err := r.readForwarding()
	if err != nil {
		r.log.Warn("cannot read the host's IP forwarding", "err", err)
		return
	}
	prev := r.host
	r.host = hostState{checked: true, fwd4: v4, fwd6: v6}
	r.fwd4.Store(v4)
	r.fwd6.Store(v6)
	for _, fam := range []struct {
		name      string
		on, was   bool
		knob, how string
	}{
		{"IPv4", v4, prev.fwd4, "net.ipv4.conf." + r.cfg.UplinkName + ".forwarding", "net.ipv4.ip_forward=1"},
		{"IPv6", v6, prev.fwd6, "net.ipv6.conf.all.forwarding", "net.ipv6.conf.all.forwarding=1"},
	} {
		switch {
		case !fam.on && (!prev.checked || fam.was):
			r.log.Error("the host does not forward "+fam.name+": pods cannot reach anything beyond the node, nor other nodes' pods; set "+
				fam.how+" (or run the agent with --ip-forward)", "sysctl", fam.knob)
		case fam.on && prev.checked && !fam.was:
			r.log.Info("the host forwards " + fam.name + " again")
		}
	}
}

// checkHost puts back what another program removed of the router's on the
// host, and reads the forwarding state.
func (r *Router) checkHost() {
	r.fwMu.Lock()
	defer r.fwMu.Unlock()
	if r.fw != nil {
		repaired, err := r.fw.ensure()
		if err != nil {
			r.log.Warn("host forward path: check failed", "err", err)
		}
		if len(repaired) > 0 && r.host.checked {
			r.log.Warn("host forward path: put back the accepts of pod traffic that another program removed or moved",
				"where", repaired)
			r.fwRepairs.Add(uint64(len(repaired)))
		}
	}
	if r.masqOn.Load() {
		if err := r.withNFT(r.ensureMasquerade); err != nil {
			r.log.Warn("masquerade: check failed", "err", err)
		}
	}
	r.checkForwardingLocked()
}

// ensureMasquerade reinstalls the masquerade table when it or its rules
// (or the anti-spoofing of veth links, when it was installed) are gone.
func (r *Router) ensureMasquerade(c *nftables.Conn) error {
	h := r.hostPol.Load()
	if err := r.ensureMasqueradeTable(c); err != nil || h == nil {
		return err
	}
	if h.intact(c) {
		return nil
	}
	r.log.Warn("NetworkPolicy on veth links: put back the policy chains that another program removed or changed", "table", "inet "+masqTableName)
	r.fwRepairs.Add(1)
	return h.install(c)
}

// ensureMasqueradeTable is ensureMasquerade without the policy chains,
// which its reinstall removes (the caller puts them back).
func (r *Router) ensureMasqueradeTable(c *nftables.Conn) error {
	t := masqTable()
	rules, err := c.GetRules(t, &nftables.Chain{Name: masqChainName, Table: t})
	if err == nil && len(rules) == len(masqRules(r.cfg)) {
		if !r.antiSpoofOn.Load() {
			return nil
		}
		rules, err = c.GetRules(t, &nftables.Chain{Name: antiSpoofChainName, Table: t})
		if err == nil && len(rules) == 1 {
			return nil
		}
	}
	r.log.Warn("masquerade: put back the nftables table that another program removed or changed", "table", "inet "+masqTableName)
	r.fwRepairs.Add(1)
	if err := installMasquerade(c, r.cfg); err != nil {
		return err
	}
	if r.antiSpoofOn.Load() {
		return installAntiSpoof(c)
	}
	return nil
}

// keepHost runs checkHost every interval until stop is closed, and lets the
// policy's connection tracker and the hairpin table give back what expired
// since.
func (r *Router) keepHost(stop <-chan struct{}, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			r.checkHost()
			r.policy.Tracker().Expire()
			r.fast.hairpin.expire()
		}
	}
}

// HostForwarding reports the host's forwarding of IPv4 and IPv6 pod traffic
// as last read (a family without a pod CIDR reads true).
func (r *Router) HostForwarding() (v4, v6 bool) {
	return r.fwd4.Load(), r.fwd6.Load()
}

// HostRepairs counts the router's rules and tables on the host that another
// program removed or moved and the router put back.
func (r *Router) HostRepairs() uint64 {
	return r.fwRepairs.Load()
}
