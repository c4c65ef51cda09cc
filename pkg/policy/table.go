package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// IP protocol numbers the tables match on (IANA).
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
	ProtoSCTP   = 132
)

// u128 is an address as a 128-bit number (IPv4 in the low 32 bits), so that
// ranges of either family compare and sort alike.
type u128 struct{ hi, lo uint64 }

func addrNum(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{lo: uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])}
	}
	b := a.As16()
	var n u128
	for i := 0; i < 8; i++ {
		n.hi = n.hi<<8 | uint64(b[i])
		n.lo = n.lo<<8 | uint64(b[8+i])
	}
	return n
}

func (a u128) less(b u128) bool { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo) }

func (a u128) cmp(b u128) int {
	switch {
	case a == b:
		return 0
	case a.less(b):
		return -1
	}
	return 1
}

func (a u128) inc() u128 {
	if a.lo == ^uint64(0) {
		return u128{hi: a.hi + 1}
	}
	return u128{hi: a.hi, lo: a.lo + 1}
}

func (a u128) dec() u128 {
	if a.lo == 0 {
		return u128{hi: a.hi - 1, lo: ^uint64(0)}
	}
	return u128{hi: a.hi, lo: a.lo - 1}
}

// addrRange is an inclusive range of addresses of one family.
type addrRange struct {
	v6     bool
	lo, hi u128
}

// prefixRange returns the addresses of p (masked).
func prefixRange(p netip.Prefix) addrRange {
	p = p.Masked()
	lo := addrNum(p.Addr())
	bits := p.Addr().BitLen()
	host := bits - p.Bits() // host bits, 0..128
	hi := lo
	switch {
	case host >= 128:
		hi = u128{hi: ^uint64(0), lo: ^uint64(0)}
	case host >= 64:
		hi.lo = ^uint64(0)
		hi.hi |= (uint64(1) << (host - 64)) - 1
	case host > 0:
		hi.lo |= (uint64(1) << host) - 1
	}
	return addrRange{v6: p.Addr().Is6(), lo: lo, hi: hi}
}

func addrRangeOf(a netip.Addr) addrRange {
	n := addrNum(a)
	return addrRange{v6: a.Is6(), lo: n, hi: n}
}

func (r addrRange) contains(a netip.Addr) bool {
	if a.Is6() != r.v6 {
		return false
	}
	n := addrNum(a)
	return !n.less(r.lo) && !r.hi.less(n)
}

// subtract returns r without the addresses of cut (same family).
func (r addrRange) subtract(cut addrRange) []addrRange {
	if cut.v6 != r.v6 || cut.hi.less(r.lo) || r.hi.less(cut.lo) {
		return []addrRange{r}
	}
	var out []addrRange
	if r.lo.less(cut.lo) {
		out = append(out, addrRange{v6: r.v6, lo: r.lo, hi: cut.lo.dec()})
	}
	if cut.hi.less(r.hi) {
		out = append(out, addrRange{v6: r.v6, lo: cut.hi.inc(), hi: r.hi})
	}
	return out
}

// portRange is a protocol's inclusive range of destination ports.
type portRange struct {
	proto  uint8
	lo, hi uint16
}

// portSet is what a peer may reach: every protocol and port (all), or the
// listed protocols' port ranges. Immutable once built.
type portSet struct {
	all    bool
	ranges []portRange
}

// allows reports whether a packet of proto to port passes. A packet
// without ports (ICMP, a later fragment, another protocol) passes only a
// set of every port: Kubernetes' ports match TCP, UDP and SCTP alone.
func (p *portSet) allows(proto uint8, port uint16, hasPort bool) bool {
	if p.all {
		return true
	}
	if !hasPort {
		return false
	}
	for _, r := range p.ranges {
		if r.proto == proto && r.lo <= port && port <= r.hi {
			return true
		}
	}
	return false
}

// union returns the union of sets, normalised: ranges sorted and merged.
func union(sets ...*portSet) portSet {
	var out portSet
	for _, s := range sets {
		if s.all {
			return portSet{all: true}
		}
		out.ranges = append(out.ranges, s.ranges...)
	}
	slices.SortFunc(out.ranges, func(a, b portRange) int {
		return cmp.Or(cmp.Compare(a.proto, b.proto), cmp.Compare(a.lo, b.lo), cmp.Compare(a.hi, b.hi))
	})
	merged := out.ranges[:0]
	for _, r := range out.ranges {
		if n := len(merged); n > 0 && merged[n-1].proto == r.proto && uint32(r.lo) <= uint32(merged[n-1].hi)+1 {
			merged[n-1].hi = max(merged[n-1].hi, r.hi)
			continue
		}
		merged = append(merged, r)
	}
	out.ranges = merged
	return out
}

// key is a set's identity for deduplication while compiling.
func (p *portSet) key() string {
	if p.all {
		return "all"
	}
	var b strings.Builder
	for _, r := range p.ranges {
		fmt.Fprintf(&b, "%d:%d-%d,", r.proto, r.lo, r.hi)
	}
	return b.String()
}

// span is a run of addresses that may reach the same ports: the index of
// their set in Table.sets.
type span struct {
	lo, hi u128
	set    int32
}

// Table is one pod's rules in one direction: the peers it allows, as
// disjoint sorted address spans of each family, each with the union of the
// port sets every rule gives it. A lookup is a binary search and a walk of
// a few port ranges; it allocates nothing. Immutable.
type Table struct {
	v4, v6 []span
	sets   []portSet
}

// Allows reports whether peer may exchange a packet of proto with the
// destination port (hasPort false: a packet without ports).
func (t *Table) Allows(peer netip.Addr, proto uint8, port uint16, hasPort bool) bool {
	set, ok := t.find(peer)
	return ok && t.sets[set].allows(proto, port, hasPort)
}

// find returns the index of the port set of the span holding peer, or
// false when no rule has it as a peer.
func (t *Table) find(peer netip.Addr) (int32, bool) {
	spans := t.v4
	if peer.Is6() {
		spans = t.v6
	}
	n := addrNum(peer)
	lo, hi := 0, len(spans)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if spans[m].hi.less(n) {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo == len(spans) || n.less(spans[lo].lo) {
		return 0, false
	}
	return spans[lo].set, true
}

// explain says why Allows denies peer a packet of proto to port, for the
// debug log: peer is no rule's, or the ports it may reach.
func (t *Table) explain(peer netip.Addr, proto uint8, port uint16, hasPort bool) string {
	set, ok := t.find(peer)
	switch {
	case !ok:
		return fmt.Sprintf("no rule has %s as a peer", peer)
	case !hasPort:
		return fmt.Sprintf("%s is a peer for %s only; a packet without ports (ICMP, another protocol, a later fragment) needs a rule of every port", peer, &t.sets[set])
	}
	return fmt.Sprintf("%s is a peer for %s only, not %s port %d", peer, &t.sets[set], protoName(proto), port)
}

// maxExplainRanges bounds the port ranges a debug line lists.
const maxExplainRanges = 8

// String lists the set's ports: "TCP 80, 1000-1005, UDP 53".
func (p *portSet) String() string {
	if p.all {
		return "every port"
	}
	var b strings.Builder
	proto := uint8(0)
	for i, r := range p.ranges {
		if i == maxExplainRanges {
			fmt.Fprintf(&b, " and %d more", len(p.ranges)-i)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		if r.proto != proto {
			proto = r.proto
			b.WriteString(protoName(proto) + " ")
		}
		if r.lo == r.hi {
			fmt.Fprintf(&b, "%d", r.lo)
		} else {
			fmt.Fprintf(&b, "%d-%d", r.lo, r.hi)
		}
	}
	return b.String()
}

// protoName names an IP protocol for the debug log.
func protoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "TCP"
	case ProtoUDP:
		return "UDP"
	case ProtoSCTP:
		return "SCTP"
	case ProtoICMP:
		return "ICMP"
	case ProtoICMPv6:
		return "ICMPv6"
	}
	return fmt.Sprintf("protocol %d", p)
}

// Len returns the number of spans, for tests and the operator's view.
func (t *Table) Len() int { return len(t.v4) + len(t.v6) }

// item is an address range a rule allows with its ports, before the sweep.
type item struct {
	r     addrRange
	ports *portSet
}

// buildTable sweeps items into a Table: wherever ranges overlap, the
// union of their port sets; adjacent spans of equal sets are joined.
func buildTable(items []item) *Table {
	t := &Table{}
	ids := map[string]int32{}
	setID := func(p portSet) int32 {
		k := p.key()
		if id, ok := ids[k]; ok {
			return id
		}
		id := int32(len(t.sets))
		ids[k] = id
		t.sets = append(t.sets, p)
		return id
	}
	for _, v6 := range []bool{false, true} {
		var fam []item
		for _, it := range items {
			if it.r.v6 == v6 {
				fam = append(fam, it)
			}
		}
		spans := sweep(fam, setID)
		if v6 {
			t.v6 = spans
		} else {
			t.v4 = spans
		}
	}
	return t
}

type event struct {
	at    u128
	end   bool // the range ended before at
	item  int
	atMax bool // an end past the family's last address: never reached
}

func sweep(items []item, setID func(portSet) int32) []span {
	if len(items) == 0 {
		return nil
	}
	maxAddr := u128{lo: 0xffffffff}
	if items[0].r.v6 {
		maxAddr = u128{hi: ^uint64(0), lo: ^uint64(0)}
	}
	evs := make([]event, 0, 2*len(items))
	for i, it := range items {
		evs = append(evs, event{at: it.r.lo, item: i})
		if it.r.hi != maxAddr {
			evs = append(evs, event{at: it.r.hi.inc(), end: true, item: i})
		}
	}
	slices.SortFunc(evs, func(a, b event) int { return a.at.cmp(b.at) })
	active := map[int]bool{}
	var out []span
	for i := 0; i < len(evs); {
		at := evs[i].at
		for ; i < len(evs) && evs[i].at == at; i++ {
			if evs[i].end {
				delete(active, evs[i].item)
			} else {
				active[evs[i].item] = true
			}
		}
		if len(active) == 0 {
			continue
		}
		hi := maxAddr
		if i < len(evs) {
			hi = evs[i].at.dec()
		}
		sets := make([]*portSet, 0, len(active))
		for j := range active {
			sets = append(sets, items[j].ports)
		}
		id := setID(union(sets...))
		if n := len(out); n > 0 && out[n-1].set == id && out[n-1].hi.inc() == at {
			out[n-1].hi = hi
			continue
		}
		out = append(out, span{lo: at, hi: hi, set: id})
	}
	return out
}
