package policy

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Denied packets by policy.
//
// NetworkPolicy is an allow list: a packet is denied because its pod is
// isolated in the packet's direction and no rule of the policies selecting
// it there allows it, so a denied packet counts against every one of those
// policies. Adding to each policy's counter packet by packet would cost as
// many atomic adds as policies select the pod (a thousand, for a pod a
// thousand policies select, on every packet a hostile peer sends), so a
// denied packet costs one: it counts in its pod's denyGroup, which every
// local pod selected in that direction by the same set of policies shares,
// and a policy's count is the sum of its groups', made when read.

// denyGroup counts the packets denied in one direction to or from the
// local pods that one set of policies selects in it.
type denyGroup struct {
	// d and policies (namespace/name, sorted) are the group's identity.
	// Immutable.
	d        Direction
	policies []string
	// n counts the packets denied.
	n atomic.Uint64
	// used is the generation of the latest snapshot whose pods count
	// in the group. Guarded by denyStats.mu.
	used uint64
}

// denyStats holds the per-policy counts from one snapshot to the next:
// Compile hands its predecessor's on. A group no longer used is folded
// into its policies' base counts one compile later, when no packet can
// still be counting in it through the snapshot before.
type denyStats struct {
	mu sync.Mutex
	// groups are the groups of the latest two compiles, by key.
	// +checklocks:mu
	groups map[string]*denyGroup
	// base are the policies' counts of groups folded, by Direction.
	// +checklocks:mu
	base map[string]*[2]uint64
	// isolates are the policies that isolate a local pod in the latest
	// compile, and in which Directions.
	// +checklocks:mu
	isolates map[string][2]bool
	// last is the latest compile's generation.
	// +checklocks:mu
	last uint64
}

func newDenyStats() *denyStats {
	return &denyStats{groups: map[string]*denyGroup{}, base: map[string]*[2]uint64{}}
}

// statsCompile is one Compile's use of the stats.
type statsCompile struct {
	st       *denyStats
	gen      uint64
	isolates map[string][2]bool
}

func (st *denyStats) begin(gen uint64) *statsCompile {
	return &statsCompile{st: st, gen: gen, isolates: map[string][2]bool{}}
}

// group returns the group of policies (sorted) in d, which a pod of the
// compile counts in.
func (c *statsCompile) group(d Direction, policies []string) *denyGroup {
	for _, p := range policies {
		iso := c.isolates[p]
		iso[d] = true
		c.isolates[p] = iso
	}
	key := d.String() + "\x00" + strings.Join(policies, "\x00")
	st := c.st
	st.mu.Lock()
	defer st.mu.Unlock()
	g := st.groups[key]
	if g == nil {
		g = &denyGroup{d: d, policies: slices.Clone(policies)}
		st.groups[key] = g
	}
	g.used = c.gen
	return g
}

// finish folds the groups neither this compile nor the one before uses
// into their policies' base counts, and forgets the policies that isolate
// no local pod any more.
func (c *statsCompile) finish() {
	st := c.st
	st.mu.Lock()
	defer st.mu.Unlock()
	for p := range st.base {
		if _, ok := c.isolates[p]; !ok {
			delete(st.base, p)
		}
	}
	for key, g := range st.groups {
		if g.used == c.gen || g.used >= st.last {
			continue
		}
		delete(st.groups, key)
		n := g.n.Load()
		if n == 0 {
			continue
		}
		for _, p := range g.policies {
			if _, ok := c.isolates[p]; !ok {
				continue
			}
			b := st.base[p]
			if b == nil {
				b = new([2]uint64)
				st.base[p] = b
			}
			b[g.d] += n
		}
	}
	st.isolates = c.isolates
	st.last = c.gen
}

// PolicyCounts are one NetworkPolicy's counters on this node.
type PolicyCounts struct {
	Namespace, Policy string
	// Isolates says, by Direction, whether the policy selects a local
	// pod in it.
	Isolates [2]bool
	// Denied counts, by Direction, the packets denied to or from the
	// local pods the policy selects in it: each denied packet counts
	// against every policy isolating its pod in its direction, so the
	// policies' counts add up to more than the packets denied when
	// several select one pod.
	Denied [2]uint64
}

// counts returns the counters of the policies isolating a local pod,
// sorted by namespace and name.
func (st *denyStats) counts() []PolicyCounts {
	st.mu.Lock()
	defer st.mu.Unlock()
	totals := make(map[string]*[2]uint64, len(st.isolates))
	for p := range st.isolates {
		t := new([2]uint64)
		if b := st.base[p]; b != nil {
			*t = *b
		}
		totals[p] = t
	}
	for _, g := range st.groups {
		n := g.n.Load()
		if n == 0 {
			continue
		}
		for _, p := range g.policies {
			if t := totals[p]; t != nil {
				t[g.d] += n
			}
		}
	}
	out := make([]PolicyCounts, 0, len(totals))
	for p, t := range totals {
		ns, name, _ := strings.Cut(p, "/")
		out = append(out, PolicyCounts{Namespace: ns, Policy: name, Isolates: st.isolates[p], Denied: *t})
	}
	slices.SortFunc(out, func(a, b PolicyCounts) int {
		return strings.Compare(a.Namespace+"/"+a.Policy, b.Namespace+"/"+b.Policy)
	})
	return out
}
