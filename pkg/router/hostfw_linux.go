package router

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/coreos/go-iptables/iptables"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// The host's forward path.
//
// Pod traffic that leaves the node (egress, host-gw to other nodes) and its
// replies cross the host's forward hook between the uplink and the host's
// other interfaces. A host firewall whose forward policy is drop (Docker sets
// iptables' FORWARD policy to DROP; hardened hosts and some distributions do
// the same in nftables) drops it there, and an accept in the router's own
// nftables table cannot help: in netfilter a drop by any base chain of a hook
// is final. So the router puts accepts for exactly its own pod traffic into
// the chains that may drop it, ahead of their rules, tagged as shm-cni's:
//
//   - iptables (legacy or nft backend), when the iptables / ip6tables command
//     is on PATH and the family's FORWARD policy is DROP (as Docker sets it;
//     with ACCEPT, FORWARD's rules belong to programs such as kube-proxy,
//     whose rejects an accept ahead of them would skip): a chain
//     SHM-CNI-FORWARD in the filter table,
//
//     -A SHM-CNI-FORWARD -i shm0 -s <pod CIDR> -j ACCEPT   (from pods)
//     -A SHM-CNI-FORWARD -o shm0 -d <pod CIDR> -j ACCEPT   (to pods)
//     -A SHM-CNI-FORWARD -i shmv+ -s <pod CIDR> -j ACCEPT  (the same on
//     -A SHM-CNI-FORWARD -o shmv+ -d <pod CIDR> -j ACCEPT   veth links)
//
//     jumped to from the first rule of FORWARD and, where Docker made it, of
//     DOCKER-USER (where Docker's documentation has administrators drop
//     traffic from outside, which would drop the pods' replies);
//   - nftables: the same four rules at the head of every other base chain of
//     the forward hook whose policy is drop (type filter, families inet, ip
//     and ip6), with the comment "shm-cni: ...". Chains whose policy is
//     accept are other programs' rule sets (kube-proxy's nftables mode
//     rejects traffic to services without endpoints there, for one): an
//     accept at their head would skip their rules, so they are left alone.
//     The iptables filter tables are left to the iptables command when it
//     is there; without it (the agent's image has none) the rules go into
//     iptables-nft's FORWARD chain natively when its policy is drop
//     (Docker's).
//
// Nothing else is accepted: a packet from one outside address to another
// still meets the host's policy. ensure checks the rules and puts back what
// another program removed or moved (the router calls it periodically);
// remove deletes every rule and chain of the router's.

// fwChain is the router's iptables chain in the filter table.
const fwChain = "SHM-CNI-FORWARD"

// fwCommentPrefix starts the comment of every rule the router puts into
// another program's chain; the router removes exactly the rules with it.
const fwCommentPrefix = "shm-cni"

// fwParents are the iptables chains that jump to fwChain from their first
// rule, when they exist (FORWARD always does).
var fwParents = []string{"FORWARD", "DOCKER-USER"}

// fwRule is one accept of the node's pod traffic.
type fwRule struct {
	// out: traffic to the pods (out through the uplink); else from them
	// (in through the uplink).
	out  bool
	cidr netip.Prefix
	// veth: through the host sides of the pods' veth links
	// (hostlink.go), every device named linkspec.HostVethPrefix and
	// more, instead of the uplink.
	veth bool
}

func (r fwRule) comment() string {
	c := fwCommentPrefix + ": from pods"
	if r.out {
		c = fwCommentPrefix + ": to pods"
	}
	if r.veth {
		c += " on veth links"
	}
	return c
}

// iptablesSpec is r as iptables rule arguments.
func (r fwRule) iptablesSpec(uplink string) []string {
	dir, addr := "-i", "-s"
	if r.out {
		dir, addr = "-o", "-d"
	}
	dev := uplink
	if r.veth {
		dev = linkspec.HostVethPrefix + "+" // iptables' wildcard
	}
	return []string{dir, dev, addr, r.cidr.String(), "-m", "comment", "--comment", r.comment(), "-j", "ACCEPT"}
}

// nftRule is r as nftables expressions and user data, for a table of
// family fam. In an ip or ip6 table the family goes without saying: the
// rule then has the shape iptables-nft writes, so that the iptables command
// reads it back (as "-s CIDR -i shm0 -m comment --comment ... -j ACCEPT").
func (r fwRule) nftRule(uplink string, fam nftables.TableFamily) ([]expr.Any, []byte) {
	key := expr.MetaKeyIIFNAME
	if r.out {
		key = expr.MetaKeyOIFNAME
	}
	dev := ifname(uplink)
	if r.veth {
		// A prefix without its NUL: the wildcard ("shmv*"), as
		// iptables-nft writes "shmv+".
		dev = []byte(linkspec.HostVethPrefix)
	}
	exprs := []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: dev},
	}
	match := matchPrefix(r.cidr, !r.out)
	if fam != nftables.TableFamilyINet {
		match = match[2:] // no "meta nfproto"
	}
	exprs = append(exprs, match...)
	exprs = append(exprs, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictAccept})
	return exprs, userdata.AppendString(nil, userdata.TypeComment, r.comment())
}

// jumpSpec is the rule of a parent chain that jumps to fwChain.
var jumpSpec = []string{"-m", "comment", "--comment", fwCommentPrefix + ": the node's pod traffic", "-j", fwChain}

// hostFirewall keeps the host's forward path open for the node's pod
// traffic. Its methods are not safe for concurrent use: the router
// serialises them (Router.fwMu).
type hostFirewall struct {
	uplink string
	// rules4 and rules6 are the accepts of each family (empty without a
	// pod CIDR of that family).
	rules4, rules6 []fwRule
	hostNS         ns.NetNS
	log            *slog.Logger
	// ipt4 and ipt6 drive iptables and ip6tables; nil where the family
	// has no pod CIDR or the command is missing.
	ipt4, ipt6 *iptables.IPTables
	// ipts pairs each non-nil driver with its family's rules.
	ipts []iptFamily
}

// iptFamily is one iptables command and the accepts of its family.
type iptFamily struct {
	ipt   *iptables.IPTables
	rules []fwRule
	v6    bool
}

// newHostFirewall prepares the accepts of cfg's pod CIDRs. It changes
// nothing.
func newHostFirewall(cfg Config, hostNS ns.NetNS, log *slog.Logger) *hostFirewall {
	f := &hostFirewall{uplink: cfg.UplinkName, hostNS: hostNS, log: log}
	for _, p := range cfg.PodCIDRs {
		rs := []fwRule{{out: false, cidr: p}, {out: true, cidr: p}, {out: false, cidr: p, veth: true}, {out: true, cidr: p, veth: true}}
		if p.Addr().Is4() {
			f.rules4 = rs
		} else {
			f.rules6 = rs
		}
	}
	if len(f.rules4) > 0 {
		f.ipt4 = newIPTables(iptables.ProtocolIPv4, log)
	}
	if len(f.rules6) > 0 {
		f.ipt6 = newIPTables(iptables.ProtocolIPv6, log)
	}
	if f.ipt4 != nil {
		f.ipts = append(f.ipts, iptFamily{f.ipt4, f.rules4, false})
	}
	if f.ipt6 != nil {
		f.ipts = append(f.ipts, iptFamily{f.ipt6, f.rules6, true})
	}
	if f.ipt4 == nil && len(f.rules4) > 0 && legacyFilterInUse() {
		log.Error("the host uses legacy iptables but there is no iptables command: " +
			"a FORWARD policy of DROP there will drop pod traffic leaving the node; install iptables beside the agent")
	}
	return f
}

// newIPTables returns a driver for proto's command, or nil when it is
// missing or broken (the nftables pass then covers the nft backend).
func newIPTables(proto iptables.Protocol, log *slog.Logger) *iptables.IPTables {
	cmd := "iptables"
	if proto == iptables.ProtocolIPv6 {
		cmd = "ip6tables"
	}
	if _, err := exec.LookPath(cmd); err != nil {
		log.Info("no "+cmd+" command: the host's forward path is kept through nftables only", "err", err)
		return nil
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(5))
	if err != nil {
		log.Warn(cmd+" unusable: the host's forward path is kept through nftables only", "err", err)
		return nil
	}
	return ipt
}

// legacyFilterInUse reports whether the kernel has a legacy (xtables)
// IPv4 filter table, which only the iptables command reaches.
func legacyFilterInUse() bool {
	b, err := os.ReadFile("/proc/net/ip_tables_names")
	return err == nil && strings.Contains(string(b), "filter")
}

// ensure installs what is missing or misplaced and reports what it had to
// repair, as a list of places ("iptables FORWARD", "nftables inet fw
// forward"); an empty list means everything was in place.
func (f *hostFirewall) ensure() (repaired []string, err error) {
	c, tables, err := f.nft()
	if err != nil {
		return nil, err
	}
	var errs []error
	err = f.hostNS.Do(func(ns.NetNS) error {
		for _, fam := range f.ipts {
			if !iptFilterInUse(tables, fam.v6) {
				continue
			}
			r, err := f.ensureIPTables(fam.ipt, fam.rules)
			repaired = append(repaired, r...)
			errs = append(errs, err)
		}
		return nil
	})
	errs = append(errs, err)
	r, err := f.ensureNFT(c)
	repaired = append(repaired, r...)
	errs = append(errs, err)
	return repaired, errors.Join(errs...)
}

// nft returns an nftables connection in the host namespace and its tables.
func (f *hostFirewall) nft() (*nftables.Conn, []*nftables.Table, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.hostNS.Fd())))
	if err != nil {
		return nil, nil, fmt.Errorf("nftables in host netns: %w", err)
	}
	tables, err := c.ListTables()
	if err != nil {
		return nil, nil, fmt.Errorf("nftables: list tables: %w", err)
	}
	return c, tables, nil
}

// iptFilterInUse reports whether a family's iptables filter table exists,
// in nftables (iptables-nft) or as a legacy table. Where it does not, no
// iptables rule can drop anything, and the router leaves iptables alone
// (listing would create the table). Call it in the host namespace.
func iptFilterInUse(tables []*nftables.Table, v6 bool) bool {
	fam, legacy := nftables.TableFamilyIPv4, "ip_tables_names"
	if v6 {
		fam, legacy = nftables.TableFamilyIPv6, "ip6_tables_names"
	}
	for _, t := range tables {
		if t.Family == fam && t.Name == "filter" {
			return true
		}
	}
	// thread-self: the calling thread's namespace, not the process's.
	b, err := os.ReadFile("/proc/thread-self/net/" + legacy)
	return err == nil && strings.Contains(string(b), "filter")
}

// ensureIPTables keeps fwChain holding exactly rules and the first rule of
// every parent chain jumping to it.
func (f *hostFirewall) ensureIPTables(ipt *iptables.IPTables, rules []fwRule) (repaired []string, err error) {
	name := iptName(ipt)
	fwd, err := ipt.List("filter", "FORWARD")
	if err != nil {
		return nil, fmt.Errorf("%s: list FORWARD: %w", name, err)
	}
	if !slices.Contains(fwd, "-P FORWARD DROP") {
		// Not (or no longer) a host that drops by default.
		return nil, f.removeIPTables(ipt)
	}
	chains, err := ipt.ListChains("filter")
	if err != nil {
		return nil, fmt.Errorf("%s: list chains: %w", name, err)
	}
	ok := slices.Contains(chains, fwChain)
	for i := 0; ok && i < len(rules); i++ {
		if ok, err = ipt.Exists("filter", fwChain, rules[i].iptablesSpec(f.uplink)...); err != nil {
			return nil, fmt.Errorf("%s: check %s: %w", name, fwChain, err)
		}
	}
	if ok {
		// No extra rule either (a stale pod CIDR).
		lines, err := ipt.List("filter", fwChain)
		if err != nil {
			return nil, fmt.Errorf("%s: list %s: %w", name, fwChain, err)
		}
		ok = countAppends(lines) == len(rules)
	}
	if !ok {
		if err := ipt.ClearChain("filter", fwChain); err != nil { // creates it if missing
			return nil, fmt.Errorf("%s: flush %s: %w", name, fwChain, err)
		}
		for _, r := range rules {
			if err := ipt.Append("filter", fwChain, r.iptablesSpec(f.uplink)...); err != nil {
				return nil, fmt.Errorf("%s: add to %s: %w", name, fwChain, err)
			}
		}
		repaired = append(repaired, name+" "+fwChain)
	}
	for _, parent := range fwParents {
		if !slices.Contains(chains, parent) {
			continue
		}
		lines := fwd
		if parent != "FORWARD" {
			if lines, err = ipt.List("filter", parent); err != nil {
				return repaired, fmt.Errorf("%s: list %s: %w", name, parent, err)
			}
		}
		if first := firstAppend(lines); strings.HasSuffix(first, " -j "+fwChain) && strings.Contains(first, fwCommentPrefix) {
			continue
		}
		// Missing, or behind another rule: put it first.
		if err := deleteAll(ipt, parent, jumpSpec); err != nil {
			return repaired, fmt.Errorf("%s: %w", name, err)
		}
		if err := ipt.Insert("filter", parent, 1, jumpSpec...); err != nil {
			return repaired, fmt.Errorf("%s: insert jump into %s: %w", name, parent, err)
		}
		repaired = append(repaired, name+" "+parent)
	}
	return repaired, nil
}

// removeIPTables deletes the jumps and fwChain.
func (f *hostFirewall) removeIPTables(ipt *iptables.IPTables) error {
	name := iptName(ipt)
	chains, err := ipt.ListChains("filter")
	if err != nil {
		return fmt.Errorf("%s: list chains: %w", name, err)
	}
	if !slices.Contains(chains, fwChain) {
		return nil // and no jump to it: iptables refuses one to a missing chain
	}
	var errs []error
	for _, parent := range fwParents {
		if slices.Contains(chains, parent) {
			errs = append(errs, deleteAll(ipt, parent, jumpSpec))
		}
	}
	if err := ipt.ClearAndDeleteChain("filter", fwChain); err != nil {
		errs = append(errs, fmt.Errorf("%s: delete %s: %w", name, fwChain, err))
	}
	return errors.Join(errs...)
}

// deleteAll deletes every copy of spec from chain.
func deleteAll(ipt *iptables.IPTables, chain string, spec []string) error {
	for range 100 {
		ok, err := ipt.Exists("filter", chain, spec...)
		if err != nil {
			return fmt.Errorf("check %s: %w", chain, err)
		}
		if !ok {
			return nil
		}
		if err := ipt.Delete("filter", chain, spec...); err != nil {
			return fmt.Errorf("delete from %s: %w", chain, err)
		}
	}
	return fmt.Errorf("delete from %s: still there after 100 deletions", chain)
}

func iptName(ipt *iptables.IPTables) string {
	if ipt.Proto() == iptables.ProtocolIPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// firstAppend returns the first rule ("-A ...") of an iptables -S listing.
func firstAppend(lines []string) string {
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			return l
		}
	}
	return ""
}

func countAppends(lines []string) int {
	n := 0
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	return n
}

// nftFamilyRules returns the accepts for a table family: both families'
// for inet, one family's for ip and ip6, none for the others.
func (f *hostFirewall) nftFamilyRules(fam nftables.TableFamily) []fwRule {
	switch fam {
	case nftables.TableFamilyINet:
		return append(append([]fwRule(nil), f.rules4...), f.rules6...)
	case nftables.TableFamilyIPv4:
		return f.rules4
	case nftables.TableFamilyIPv6:
		return f.rules6
	}
	return nil
}

// nftTarget reports whether the router keeps its accepts at the head of
// chain c: a base chain of the forward hook of type filter whose policy is
// drop, not in the router's own table, and not an iptables filter table the
// iptables command already serves.
func (f *hostFirewall) nftTarget(c *nftables.Chain) bool {
	if c.Hooknum == nil || *c.Hooknum != *nftables.ChainHookForward || c.Type != nftables.ChainTypeFilter ||
		c.Policy == nil || *c.Policy != nftables.ChainPolicyDrop {
		return false
	}
	t := c.Table
	switch {
	case t.Family == nftables.TableFamilyINet && t.Name == masqTableName:
		return false
	case t.Family == nftables.TableFamilyIPv4 && t.Name == "filter" && f.ipt4 != nil:
		return false
	case t.Family == nftables.TableFamilyIPv6 && t.Name == "filter" && f.ipt6 != nil:
		return false
	}
	return len(f.nftFamilyRules(t.Family)) > 0
}

// isOurs reports whether r carries the router's comment.
func isOurs(r *nftables.Rule) bool {
	c, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	return ok && strings.HasPrefix(c, fwCommentPrefix)
}

// ensureNFT keeps the router's accepts as the first rules of every target
// chain, in one transaction.
func (f *hostFirewall) ensureNFT(c *nftables.Conn) (repaired []string, err error) {
	chains, err := c.ListChains()
	if err != nil {
		return nil, fmt.Errorf("nftables: list chains: %w", err)
	}
	for _, ch := range chains {
		if !f.nftTarget(ch) {
			continue
		}
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			return repaired, fmt.Errorf("nftables: list %s: %w", nftChainName(ch), err)
		}
		want := f.nftFamilyRules(ch.Table.Family)
		if headIsOurs(rules, len(want)) {
			continue
		}
		for _, r := range rules {
			if isOurs(r) {
				if err := c.DelRule(r); err != nil {
					return repaired, fmt.Errorf("nftables: delete from %s: %w", nftChainName(ch), err)
				}
			}
		}
		// Each insert goes first: insert in reverse to keep the order.
		for i := len(want) - 1; i >= 0; i-- {
			exprs, ud := want[i].nftRule(f.uplink, ch.Table.Family)
			c.InsertRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: exprs, UserData: ud})
		}
		repaired = append(repaired, "nftables "+nftChainName(ch))
	}
	if len(repaired) == 0 {
		return nil, nil
	}
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("nftables: accept pod traffic in %s: %w", strings.Join(repaired, ", "), err)
	}
	return repaired, nil
}

// headIsOurs reports whether rules start with n rules of the router's and
// hold no other.
func headIsOurs(rules []*nftables.Rule, n int) bool {
	if len(rules) < n {
		return false
	}
	for i, r := range rules {
		if isOurs(r) != (i < n) {
			return false
		}
	}
	return true
}

// removeNFT deletes every rule with the router's comment from every chain.
func (f *hostFirewall) removeNFT(c *nftables.Conn) error {
	chains, err := c.ListChains()
	if err != nil {
		return fmt.Errorf("nftables: list chains: %w", err)
	}
	n := 0
	for _, ch := range chains {
		if ch.Table.Name == masqTableName && ch.Table.Family == nftables.TableFamilyINet {
			continue
		}
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			return fmt.Errorf("nftables: list %s: %w", nftChainName(ch), err)
		}
		for _, r := range rules {
			if isOurs(r) {
				if err := c.DelRule(r); err != nil {
					return fmt.Errorf("nftables: delete from %s: %w", nftChainName(ch), err)
				}
				n++
			}
		}
	}
	if n == 0 {
		return nil
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: delete the router's accepts: %w", err)
	}
	return nil
}

// remove deletes every rule and chain ensure made, in iptables and
// nftables.
func (f *hostFirewall) remove() error {
	c, tables, err := f.nft()
	if err != nil {
		return err
	}
	var errs []error
	err = f.hostNS.Do(func(ns.NetNS) error {
		for _, fam := range f.ipts {
			if iptFilterInUse(tables, fam.v6) {
				errs = append(errs, f.removeIPTables(fam.ipt))
			}
		}
		return nil
	})
	errs = append(errs, err, f.removeNFT(c))
	return errors.Join(errs...)
}

// nftChainName names c as nft does: "inet filter forward".
func nftChainName(c *nftables.Chain) string {
	fam := map[nftables.TableFamily]string{
		nftables.TableFamilyINet: "inet", nftables.TableFamilyIPv4: "ip", nftables.TableFamilyIPv6: "ip6",
	}[c.Table.Family]
	return fmt.Sprintf("%s %s %s", fam, c.Table.Name, c.Name)
}
