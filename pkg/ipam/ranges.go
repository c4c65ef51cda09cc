package ipam

import (
	"errors"
	"fmt"
	"math"
	"net/netip"

	"github.com/shm-cni/shm-cni/internal/netipx"
)

// Family is an address family.
type Family int

// Address families, in the order Allocate returns addresses.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// String implements fmt.Stringer.
func (f Family) String() string {
	switch f {
	case IPv4:
		return "IPv4"
	case IPv6:
		return "IPv6"
	}
	return fmt.Sprintf("Family(%d)", int(f))
}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// addrRange is one validated pod CIDR with its reserved addresses. Immutable.
type addrRange struct {
	prefix  netip.Prefix
	network netip.Addr // never handed out; IPv6 subnet-router anycast
	gateway netip.Addr // network+1, the node's address on the uplink
	first   netip.Addr // first address handed out: network+2
	last    netip.Addr // last address handed out: broadcast-1 (IPv4) or the last address (IPv6)
	// usable is how many addresses can be handed out, saturated at
	// math.MaxUint64 (an IPv6 /64 has 2^64-2).
	usable uint64
}

// newRange validates p and computes its reserved addresses.
func newRange(p netip.Prefix) (*addrRange, error) {
	if !p.IsValid() {
		return nil, fmt.Errorf("range %s: invalid prefix", p)
	}
	if p.Addr().Is4In6() {
		return nil, fmt.Errorf("range %s: IPv4-mapped IPv6 prefix, give it as IPv4", p)
	}
	if p.Addr().Zone() != "" {
		return nil, fmt.Errorf("range %s: zoned address", p)
	}
	if m := p.Masked(); m != p {
		return nil, fmt.Errorf("range %s: not canonical (host bits set), did you mean %s?", p, m)
	}
	hostBits := p.Addr().BitLen() - p.Bits()
	// Reserved: network, gateway, and for IPv4 the broadcast address.
	reserved := uint64(2)
	if p.Addr().Is4() {
		reserved = 3
	}
	usable := uint64(math.MaxUint64)
	if hostBits < 64 {
		size := uint64(1) << hostBits
		if size <= reserved {
			return nil, fmt.Errorf("range %s: too small, no address left after reserving network, gateway and broadcast addresses (need at least /30 for IPv4, /126 for IPv6)", p)
		}
		usable = size - reserved
	}
	r := &addrRange{
		prefix:  p,
		network: p.Addr(),
		gateway: p.Addr().Next(),
		first:   p.Addr().Next().Next(),
		last:    netipx.LastAddr(p),
		usable:  usable,
	}
	if p.Addr().Is4() {
		r.last = r.last.Prev() // the broadcast address
	}
	return r, nil
}

func (r *addrRange) family() Family { return familyOf(r.network) }

// usableAddr reports whether a may be handed out from r.
func (r *addrRange) usableAddr(a netip.Addr) bool {
	return r.prefix.Contains(a) && a.Compare(r.first) >= 0 && a.Compare(r.last) <= 0
}

// next returns the usable address after a, wrapping from last to first.
// An a outside the usable span yields first.
func (r *addrRange) next(a netip.Addr) netip.Addr {
	if !r.usableAddr(a) || a == r.last {
		return r.first
	}
	return a.Next()
}

// validateRanges checks ranges and returns them ordered IPv4 first.
func validateRanges(ranges []netip.Prefix) ([]*addrRange, error) {
	if len(ranges) == 0 {
		return nil, errors.New("no ranges configured")
	}
	var out []*addrRange
	var errs []error
	for _, p := range ranges {
		r, err := newRange(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ok := true
		for _, o := range out {
			if o.prefix.Overlaps(p) {
				errs = append(errs, fmt.Errorf("range %s overlaps range %s", p, o.prefix))
				ok = false
			} else if o.family() == r.family() {
				errs = append(errs, fmt.Errorf("range %s: more than one %s range (already have %s)", p, r.family(), o.prefix))
				ok = false
			}
		}
		if ok {
			out = append(out, r)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(out) == 2 && out[0].family() == IPv6 {
		out[0], out[1] = out[1], out[0]
	}
	return out, nil
}
