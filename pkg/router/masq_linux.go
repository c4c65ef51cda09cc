package router

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// masqTableName names the router's nftables table (inet family) in the host.
const masqTableName = "shm-cni"

// masqChainName names the table's postrouting NAT chain.
const masqChainName = "postrouting"

// antiSpoofChainName names the table's prerouting filter chain that drops
// what a veth link's pod sends from an address the host would not route
// back to it (antiSpoofRule).
const antiSpoofChainName = "antispoof"

// IPv4 and IPv6 header offsets of the source and destination addresses.
const (
	ipv4SrcOffset = 12 // RFC 791: 4 bytes at 12
	ipv4DstOffset = 16 // RFC 791: 4 bytes at 16
	ipv6SrcOffset = 8  // RFC 8200: 16 bytes at 8
	ipv6DstOffset = 24 // RFC 8200: 16 bytes at 8+16
)

// masqTable is the router's table.
func masqTable() *nftables.Table {
	return &nftables.Table{Name: masqTableName, Family: nftables.TableFamilyINet}
}

// installMasquerade replaces the host's shm-cni table, atomically, by one
// whose postrouting NAT chain, with Config.Masquerade, masquerades traffic
// from the pod CIDRs to anything not in the pod CIDRs or cluster CIDRs that
// does not leave through the uplink:
//
//	oifname "shm0" return
//	ip daddr <each pod/cluster CIDR> return   (ip6 alike)
//	ip saddr <each pod CIDR> masquerade       (ip6 alike)
//
// A pod's connection to a Service whose endpoint is a pod of this node
// comes back through the uplink unchanged: the router sends its replies
// back through the host (hairpin.go). (The table used to masquerade such
// connections to the node gateway, which hid the client from the
// endpoint's NetworkPolicy.)
func installMasquerade(c *nftables.Conn, cfg Config) error {
	t := masqTable()
	// Add (a no-op when it exists), delete, add: one transaction that
	// replaces whatever table was there, or creates it.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	ch := c.AddChain(&nftables.Chain{
		Name:     masqChainName,
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	for _, exprs := range masqRules(cfg) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: exprs})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table inet %s: %w", masqTableName, err)
	}
	return nil
}

// installAntiSpoof adds the anti-spoofing of veth links (antiSpoofRule) to
// the table installMasquerade made, in a transaction of its own: a kernel
// without nftables' fib expression (CONFIG_NFT_FIB_INET) refuses it, and
// the router then works on without it but refuses veth links
// (Router.AddHostLink).
func installAntiSpoof(c *nftables.Conn) error {
	t := masqTable()
	ch := c.AddChain(&nftables.Chain{
		Name:     antiSpoofChainName,
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookPrerouting,
		Priority: nftables.ChainPriorityRaw,
	})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: antiSpoofRule()})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("add chain inet %s %s: %w", masqTableName, antiSpoofChainName, err)
	}
	return nil
}

// antiSpoofRule is the anti-spoofing of the pods on veth links (the
// agent's kind veth), whose packets reach the host's kernel without
// crossing the router's filter: a strict reverse path check on every
// host side of such a link, for both families, as rp_filter=1 does for
// IPv4 alone:
//
//	iifname "shmv*" fib saddr . iif oif missing counter drop
//
// The host routes a pod's addresses (and no other) to its veth, so a
// packet from any other source is dropped: another pod's address, the
// host's, the world's. IPv6 link-local sources pass (the kernel's fe80::/64
// route on each device).
func antiSpoofRule() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		// A prefix without its NUL: nftables' wildcard "shmv*".
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(linkspec.HostVethPrefix)},
		&expr.Fib{Register: 1, FlagSADDR: true, FlagIIF: true, ResultOIF: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0, 0, 0}},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
}

// removeMasquerade deletes the host's shm-cni table if it exists.
func removeMasquerade(c *nftables.Conn) error {
	t := masqTable()
	c.AddTable(t) // so that the delete succeeds when the table is gone
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("delete nftables table inet %s: %w", masqTableName, err)
	}
	return nil
}

// masqRules returns the chain's rules in order.
func masqRules(cfg Config) [][]expr.Any {
	if !cfg.Masquerade {
		return nil
	}
	var rules [][]expr.Any
	rules = append(rules, []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(cfg.UplinkName)},
		&expr.Verdict{Kind: expr.VerdictReturn},
	})
	exempt := append(append([]netip.Prefix(nil), cfg.PodCIDRs...), cfg.ClusterCIDRs...)
	for _, p := range exempt {
		rules = append(rules, append(matchPrefix(p, false), &expr.Verdict{Kind: expr.VerdictReturn}))
	}
	for _, p := range cfg.PodCIDRs {
		rules = append(rules, append(matchPrefix(p, true), &expr.Masq{}))
	}
	return rules
}

// matchPrefix matches packets of p's family whose source (src) or
// destination address is in p: "meta nfproto" (two expressions, first),
// then the address.
func matchPrefix(p netip.Prefix, src bool) []expr.Any {
	nfproto, offset := byte(unix.NFPROTO_IPV6), uint32(ipv6DstOffset)
	switch {
	case p.Addr().Is4() && src:
		nfproto, offset = unix.NFPROTO_IPV4, ipv4SrcOffset
	case p.Addr().Is4():
		nfproto, offset = unix.NFPROTO_IPV4, ipv4DstOffset
	case src:
		offset = ipv6SrcOffset
	}
	size := uint32(p.Addr().BitLen() / 8)
	mask := prefixToIPNet(p).Mask
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: size},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: size, Mask: mask, Xor: make([]byte, size)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Addr().AsSlice()},
	}
}

// ifname returns name as the kernel stores it, NUL padded to IFNAMSIZ.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}
