package ipam

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
)

// File names inside the state directory; see the package doc.
const (
	stateFile    = "state.json"
	stateTmpFile = "state.json.tmp"
	lockFile     = "lock"

	stateVersion = 1
)

// state is the allocator's whole persistent state. A state is never mutated
// once it has been written; changes build a new one (see clone).
type state struct {
	// cursors maps a range to the last address reserved in it.
	cursors map[netip.Prefix]netip.Addr
	// allocs maps an owner to its addresses, IPv4 first.
	allocs map[Owner][]netip.Addr
	// used maps every allocated address to its owner.
	used map[netip.Addr]Owner
}

func newState() *state {
	return &state{
		cursors: map[netip.Prefix]netip.Addr{},
		allocs:  map[Owner][]netip.Addr{},
		used:    map[netip.Addr]Owner{},
	}
}

func (s *state) clone() *state {
	c := &state{
		cursors: make(map[netip.Prefix]netip.Addr, len(s.cursors)),
		allocs:  make(map[Owner][]netip.Addr, len(s.allocs)),
		used:    make(map[netip.Addr]Owner, len(s.used)),
	}
	for k, v := range s.cursors {
		c.cursors[k] = v
	}
	for k, v := range s.allocs {
		c.allocs[k] = v // address slices are never mutated in place
	}
	for k, v := range s.used {
		c.used[k] = v
	}
	return c
}

// add records an allocation; the caller has checked that owner and addrs are free.
func (s *state) add(o Owner, addrs []netip.Addr) {
	s.allocs[o] = addrs
	for _, a := range addrs {
		s.used[a] = o
	}
}

// remove deletes o's allocation and reports whether there was one.
func (s *state) remove(o Owner) ([]netip.Addr, bool) {
	addrs, ok := s.allocs[o]
	if !ok {
		return nil, false
	}
	delete(s.allocs, o)
	for _, a := range addrs {
		delete(s.used, a)
	}
	return addrs, true
}

// sortedAllocations returns every allocation ordered by owner.
func (s *state) sortedAllocations() []Allocation {
	out := make([]Allocation, 0, len(s.allocs))
	for o, addrs := range s.allocs {
		out = append(out, Allocation{Owner: o, Addrs: slices.Clone(addrs)})
	}
	slices.SortFunc(out, func(a, b Allocation) int { return a.Owner.Compare(b.Owner) })
	return out
}

// fileState is the JSON form of state; see the package doc.
type fileState struct {
	Version     int                         `json:"version"`
	Cursors     map[netip.Prefix]netip.Addr `json:"cursors"`
	Allocations []fileAllocation            `json:"allocations"`
}

type fileAllocation struct {
	ContainerID string       `json:"containerID"`
	IfName      string       `json:"ifName"`
	Addrs       []netip.Addr `json:"addrs"`
}

// marshalState encodes s deterministically.
func marshalState(s *state) ([]byte, error) {
	f := fileState{Version: stateVersion, Cursors: s.cursors, Allocations: []fileAllocation{}}
	for _, a := range s.sortedAllocations() {
		f.Allocations = append(f.Allocations, fileAllocation{ContainerID: a.Owner.ContainerID, IfName: a.Owner.IfName, Addrs: a.Addrs})
	}
	b, err := json.MarshalIndent(f, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("encode state: %w", err)
	}
	return append(b, '\n'), nil
}

// parseState decodes and validates a state file. The bytes are untrusted in
// the sense that they may be damaged: every invariant the allocator relies on
// is checked here.
func parseState(b []byte) (*state, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f fileState
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after state object")
	}
	if f.Version != stateVersion {
		return nil, fmt.Errorf("unsupported version %d, want %d", f.Version, stateVersion)
	}
	s := newState()
	for p, a := range f.Cursors {
		if _, err := newRange(p); err != nil {
			return nil, fmt.Errorf("cursor: %w", err)
		}
		if !p.Contains(a) {
			return nil, fmt.Errorf("cursor %s for range %s is outside the range", a, p)
		}
		s.cursors[p] = a
	}
	for i, fa := range f.Allocations {
		o := Owner{ContainerID: fa.ContainerID, IfName: fa.IfName}
		if err := validateOwner(o); err != nil {
			return nil, fmt.Errorf("allocation %d: %w", i, err)
		}
		if _, dup := s.allocs[o]; dup {
			return nil, fmt.Errorf("allocation %d: duplicate owner %s", i, o)
		}
		if err := checkAddrs(fa.Addrs); err != nil {
			return nil, fmt.Errorf("allocation %d (%s): %w", i, o, err)
		}
		for _, a := range fa.Addrs {
			if prev, dup := s.used[a]; dup {
				return nil, fmt.Errorf("allocation %d (%s): address %s also allocated to %s", i, o, a, prev)
			}
		}
		s.add(o, slices.Clone(fa.Addrs))
	}
	return s, nil
}

// checkAddrs checks the shape of one allocation's addresses: one or two plain
// addresses, at most one per family, IPv4 first.
func checkAddrs(addrs []netip.Addr) error {
	if len(addrs) == 0 || len(addrs) > 2 {
		return fmt.Errorf("%d addresses, want 1 or 2", len(addrs))
	}
	for _, a := range addrs {
		if !a.IsValid() || a.Zone() != "" || a.Is4In6() {
			return fmt.Errorf("address %q is not a plain IPv4 or IPv6 address", a)
		}
	}
	if len(addrs) == 2 && (!addrs[0].Is4() || !addrs[1].Is6()) {
		return fmt.Errorf("addresses %s, %s: want one IPv4 then one IPv6", addrs[0], addrs[1])
	}
	return nil
}

// readState loads dir's state file; a missing file is an empty state.
func readState(dir string) (*state, error) {
	path := filepath.Join(dir, stateFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return newState(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("read ipam state %s: %w", path, err)
	}
	s, err := parseState(b)
	if err != nil {
		return nil, fmt.Errorf("parse ipam state %s: %w", path, err)
	}
	return s, nil
}

// stateWrites counts writeState calls, for the group commit's tests.
var stateWrites atomic.Uint64

// writeState makes s dir's state durably and atomically: temp file, fsync,
// rename, fsync of the directory.
func writeState(dir string, s *state) error {
	stateWrites.Add(1)
	b, err := marshalState(s)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, stateTmpFile)
	path := filepath.Join(dir, stateFile)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write ipam state %s: %w", tmp, err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write ipam state %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write ipam state %s: %w", path, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync ipam state dir %s: %w", dir, err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync ipam state dir %s: %w", dir, err)
	}
	return nil
}
