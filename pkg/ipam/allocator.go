package ipam

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

var (
	// ErrExhausted means a range has no free address left.
	ErrExhausted = errors.New("address range exhausted")
	// ErrLocked means another Allocator holds the state directory.
	ErrLocked = errors.New("state directory in use by another allocator")
	// ErrClosed means the Allocator has been closed.
	ErrClosed = errors.New("allocator closed")
)

var (
	_ fmt.Stringer = Owner{}
	_ fmt.Stringer = Family(0)
)

// Owner identifies an allocation: one interface of one container, as CNI
// names it. It is the key of the pod link the addresses are for.
type Owner = linkspec.Key

// validateOwner checks that o names a container and an interface.
func validateOwner(o Owner) error {
	if o.ContainerID == "" || o.IfName == "" {
		return fmt.Errorf("owner %q: container ID and interface name must not be empty", o.String())
	}
	return nil
}

// Allocation is one owner's addresses, IPv4 first.
type Allocation struct {
	Owner Owner
	Addrs []netip.Addr
}

// Options tune an Allocator.
type Options struct {
	// Logger receives allocation events; nil discards them.
	Logger *slog.Logger
}

// Allocator hands out addresses from the node's pod ranges and persists them.
// Create it with Open; it is safe for concurrent use.
type Allocator struct {
	dir    string       // immutable
	ranges []*addrRange // immutable, IPv4 first
	log    *slog.Logger // immutable

	mu sync.Mutex
	// st is the current state; replaced, never mutated. It may be ahead
	// of the disk: ver counts its versions and durable is the last one
	// written. One write runs at a time, outside mu (writing); changes
	// made meanwhile go to disk together in the next write (group
	// commit), and written is signalled when a write ends.
	// +checklocks:mu
	st *state
	// +checklocks:mu
	ver, durable uint64
	// +checklocks:mu
	writing bool
	written *sync.Cond // on mu; immutable
	// lock holds the directory's flock; nil once closed.
	// +checklocks:mu
	lock *os.File
}

// Open validates ranges, locks dir (creating it if needed) and loads the
// state stored there. See the package doc for the rules on ranges and the
// on-disk format.
func Open(dir string, ranges []netip.Prefix, opts Options) (*Allocator, error) {
	rs, err := validateRanges(ranges)
	if err != nil {
		return nil, fmt.Errorf("open ipam %s: %w", dir, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		// Make the new directory's own entry durable too.
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("open ipam %s: %w", dir, err)
		}
		if err := syncDir(filepath.Dir(dir)); err != nil {
			return nil, fmt.Errorf("open ipam %s: %w", dir, err)
		}
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("open ipam %s: %w", dir, err)
	}
	success := false
	defer func() {
		if !success {
			lock.Close()
		}
	}()
	// A crash may leave a half-written temp file; it was never the state.
	if err := os.Remove(filepath.Join(dir, stateTmpFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open ipam %s: %w", dir, err)
	}
	st, err := readState(dir)
	if err != nil {
		return nil, fmt.Errorf("open ipam %s: %w", dir, err)
	}
	a := &Allocator{dir: dir, ranges: rs, log: log, st: st, lock: lock}
	a.written = sync.NewCond(&a.mu)
	for _, al := range st.sortedAllocations() {
		for _, ip := range al.Addrs {
			if !a.usable(ip) {
				log.Warn("ipam: stored address is not allocatable from the configured ranges; keeping it",
					"owner", al.Owner.String(), "addr", ip)
			}
		}
	}
	log.Info("ipam: opened", "dir", dir, "ranges", ranges, "allocations", len(st.allocs))
	success = true
	return a, nil
}

func (a *Allocator) usable(ip netip.Addr) bool {
	for _, r := range a.ranges {
		if r.usableAddr(ip) {
			return true
		}
	}
	return false
}

// Allocate returns o's addresses, one per configured range, IPv4 first,
// allocating them if o has none yet. Calling it again for the same owner
// returns the same addresses. The allocation is on disk when it returns;
// concurrent calls share their writes.
func (a *Allocator) Allocate(o Owner) ([]netip.Addr, error) {
	r, err := a.reserve(o)
	if err != nil {
		return nil, err
	}
	if err := r.commit(); err != nil {
		a.undoReserve(o, r)
		return nil, err
	}
	return r.addrs, nil
}

// Reserve is Allocate in two steps: it takes o's addresses in memory at
// once (later calls see them taken), and commit returns once they are on
// disk, written together with every other change made until the write
// starts. Until commit succeeded the addresses must not be handed out:
// after a crash they are free again. When commit fails, Release o (the
// failed write's state may still reach the disk with a later one).
func (a *Allocator) Reserve(o Owner) (addrs []netip.Addr, commit func() error, err error) {
	r, err := a.reserve(o)
	if err != nil {
		return nil, nil, err
	}
	return r.addrs, r.commit, nil
}

// reservation is what reserve took.
type reservation struct {
	addrs  []netip.Addr
	cursor map[netip.Prefix]netip.Addr // the cursors before, nil if none moved
	commit func() error
}

func (a *Allocator) reserve(o Owner) (reservation, error) {
	if err := validateOwner(o); err != nil {
		return reservation{}, fmt.Errorf("allocate %s: %w", o, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.lock == nil {
		return reservation{}, fmt.Errorf("allocate %s: %w", o, ErrClosed)
	}
	what := fmt.Sprintf("allocate %s", o)
	if addrs, ok := a.st.allocs[o]; ok {
		// Perhaps reserved by a call whose commit has not finished:
		// this caller too gets the addresses once they are on disk.
		return reservation{addrs: slices.Clone(addrs), commit: a.committer(what, a.ver)}, nil
	}
	next := a.st.clone()
	r := reservation{cursor: make(map[netip.Prefix]netip.Addr, len(a.ranges))}
	for _, rg := range a.ranges {
		ip, err := pick(next, rg)
		if err != nil {
			return reservation{}, fmt.Errorf("allocate %s in %s: %w", o, rg.prefix, err)
		}
		r.addrs = append(r.addrs, ip)
		r.cursor[rg.prefix] = next.cursors[rg.prefix]
		next.cursors[rg.prefix] = ip
	}
	next.add(o, slices.Clone(r.addrs))
	a.setLocked(next)
	a.log.Debug("ipam: allocated", "owner", o.String(), "addrs", r.addrs)
	r.commit = a.committer(what, a.ver)
	return r, nil
}

// undoReserve takes back r, a reservation of o whose commit failed, and
// puts the cursors back where they were, unless o or the cursors moved on
// meanwhile.
func (a *Allocator) undoReserve(o Owner, r reservation) {
	a.mu.Lock()
	defer a.mu.Unlock()
	cur, ok := a.st.allocs[o]
	if !ok || !slices.Equal(cur, r.addrs) || r.cursor == nil {
		return
	}
	next := a.st.clone()
	next.remove(o)
	for i, rg := range a.ranges {
		if next.cursors[rg.prefix] == r.addrs[i] {
			if c, ok := r.cursor[rg.prefix]; ok && c.IsValid() {
				next.cursors[rg.prefix] = c
			} else {
				delete(next.cursors, rg.prefix)
			}
		}
	}
	a.setLocked(next)
}

// retakeLocked gives o back addrs after a release that did not reach the
// disk, so that memory agrees with the disk again; unless o holds
// addresses again or one of addrs went to another owner meanwhile (then the
// next write settles the disk on what memory says).
//
// +checklocks:a.mu
func (a *Allocator) retakeLocked(o Owner, addrs []netip.Addr) {
	if _, ok := a.st.allocs[o]; ok {
		return
	}
	for _, ip := range addrs {
		if _, taken := a.st.used[ip]; taken {
			return
		}
	}
	next := a.st.clone()
	next.add(o, addrs)
	a.setLocked(next)
}

// setLocked makes next the current state, a new version.
//
// +checklocks:a.mu
func (a *Allocator) setLocked(next *state) {
	a.st = next
	a.ver++
}

// committer returns a function that waits until version v is on disk.
func (a *Allocator) committer(what string, v uint64) func() error {
	return func() error {
		a.mu.Lock()
		defer a.mu.Unlock()
		if err := a.commitLocked(v); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
}

// commitLocked returns once version v of the state is on disk: it waits
// for a write in progress, or writes the current state itself (which
// includes v and whatever came after). A failed write is reported to the
// caller that made it; a caller waiting for it tries again.
//
// +checklocks:a.mu
func (a *Allocator) commitLocked(v uint64) error {
	for a.durable < v {
		if a.writing {
			a.written.Wait()
			continue
		}
		if a.lock == nil {
			return ErrClosed
		}
		a.writing = true
		snap, sv := a.st, a.ver
		a.mu.Unlock()
		err := writeState(a.dir, snap)
		a.mu.Lock()
		a.writing = false
		a.written.Broadcast()
		if err != nil {
			return err
		}
		a.durable = max(a.durable, sv)
	}
	return nil
}

// pick returns the first free address of r after r's cursor in s.
func pick(s *state, r *addrRange) (netip.Addr, error) {
	var taken uint64
	for ip := range s.used {
		if r.usableAddr(ip) {
			taken++
		}
	}
	if taken >= r.usable {
		return netip.Addr{}, ErrExhausted
	}
	// Of any taken+1 consecutive usable addresses at least one is free.
	ip := r.next(s.cursors[r.prefix])
	for range taken + 1 {
		if _, ok := s.used[ip]; !ok {
			return ip, nil
		}
		ip = r.next(ip)
	}
	return netip.Addr{}, fmt.Errorf("no free address found although %d of %d are taken", taken, r.usable)
}

// Release frees o's addresses. Releasing an unknown owner is not an error
// (CNI DEL may be called several times).
func (a *Allocator) Release(o Owner) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.lock == nil {
		return fmt.Errorf("release %s: %w", o, ErrClosed)
	}
	if _, ok := a.st.allocs[o]; !ok {
		return nil
	}
	next := a.st.clone()
	addrs, _ := next.remove(o)
	a.setLocked(next)
	if err := a.commitLocked(a.ver); err != nil {
		a.retakeLocked(o, addrs)
		return fmt.Errorf("release %s: %w", o, err)
	}
	a.log.Debug("ipam: released", "owner", o.String(), "addrs", addrs)
	return nil
}

// ReleaseExcept frees every allocation whose owner is not in valid (CNI GC)
// and returns them, ordered by owner.
func (a *Allocator) ReleaseExcept(valid []Owner) ([]Allocation, error) {
	keep := make(map[Owner]bool, len(valid))
	for _, o := range valid {
		keep[o] = true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.lock == nil {
		return nil, fmt.Errorf("release except %d owners: %w", len(valid), ErrClosed)
	}
	var released []Allocation
	for _, al := range a.st.sortedAllocations() {
		if !keep[al.Owner] {
			released = append(released, al)
		}
	}
	if len(released) == 0 {
		return nil, nil
	}
	next := a.st.clone()
	for _, al := range released {
		next.remove(al.Owner)
	}
	a.setLocked(next)
	if err := a.commitLocked(a.ver); err != nil {
		for _, al := range released {
			a.retakeLocked(al.Owner, al.Addrs)
		}
		return nil, fmt.Errorf("release except %d owners: %w", len(valid), err)
	}
	for _, al := range released {
		a.log.Info("ipam: garbage-collected", "owner", al.Owner.String(), "addrs", al.Addrs)
	}
	return released, nil
}

// Get returns o's allocation, if any.
func (a *Allocator) Get(o Owner) (Allocation, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	addrs, ok := a.st.allocs[o]
	if !ok {
		return Allocation{}, false
	}
	return Allocation{Owner: o, Addrs: slices.Clone(addrs)}, true
}

// List returns every allocation, ordered by owner.
func (a *Allocator) List() []Allocation {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st.sortedAllocations()
}

// Ranges returns the configured ranges, IPv4 first.
func (a *Allocator) Ranges() []netip.Prefix {
	out := make([]netip.Prefix, len(a.ranges))
	for i, r := range a.ranges {
		out[i] = r.prefix
	}
	return out
}

// Gateway returns the address reserved for the node in the range of family
// f (the range's first address after the network address), and false when
// no range of that family is configured.
func (a *Allocator) Gateway(f Family) (netip.Addr, bool) {
	for _, r := range a.ranges {
		if r.family() == f {
			return r.gateway, true
		}
	}
	return netip.Addr{}, false
}

// Gateways returns the gateway address of every range, IPv4 first.
func (a *Allocator) Gateways() []netip.Addr {
	out := make([]netip.Addr, len(a.ranges))
	for i, r := range a.ranges {
		out[i] = r.gateway
	}
	return out
}

// Close releases the directory lock. Later calls that change state fail
// with ErrClosed; Get and List keep answering from memory. Close is
// idempotent.
func (a *Allocator) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for a.writing {
		a.written.Wait()
	}
	if a.lock == nil {
		return nil
	}
	err := a.lock.Close()
	a.lock = nil
	if err != nil {
		return fmt.Errorf("close ipam %s: %w", a.dir, err)
	}
	return nil
}
