package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

func openT(t *testing.T, dir string, ranges ...string) *Allocator {
	t.Helper()
	a, err := Open(dir, prefixes(t, ranges...), Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func mustAlloc(t *testing.T, a *Allocator, o Owner) []netip.Addr {
	t.Helper()
	got, err := a.Allocate(o)
	if err != nil {
		t.Fatalf("Allocate(%s): %v", o, err)
	}
	return got
}

func owner(cid string) Owner { return Owner{ContainerID: cid, IfName: "eth0"} }

// TestAllocateIdempotent checks that the same owner gets the same addresses
// and another interface of the same container gets different ones.
func TestAllocateIdempotent(t *testing.T) {
	a := openT(t, t.TempDir(), "10.0.0.0/24", "fd00::/64")
	first := mustAlloc(t, a, owner("c1"))
	if again := mustAlloc(t, a, owner("c1")); !slices.Equal(first, again) {
		t.Errorf("second Allocate = %v, want %v", again, first)
	}
	other := mustAlloc(t, a, Owner{ContainerID: "c1", IfName: "net1"})
	if slices.Contains(other, first[0]) || slices.Contains(other, first[1]) {
		t.Errorf("net1 got %v, shares an address with eth0's %v", other, first)
	}
	if got, want := len(a.List()), 2; got != want {
		t.Errorf("List has %d allocations, want %d", got, want)
	}
	got, ok := a.Get(owner("c1"))
	if !ok || !slices.Equal(got.Addrs, first) {
		t.Errorf("Get = %v, %v; want %v, true", got, ok, first)
	}
}

// TestAllocateRejectsEmptyOwner checks owner validation.
func TestAllocateRejectsEmptyOwner(t *testing.T) {
	a := openT(t, t.TempDir(), "10.0.0.0/24")
	for _, o := range []Owner{{}, {ContainerID: "c"}, {IfName: "eth0"}} {
		if _, err := a.Allocate(o); err == nil {
			t.Errorf("Allocate(%+v) succeeded, want error", o)
		}
	}
}

// TestExhaustion checks the error when a range is full and that releasing
// an address makes room again.
func TestExhaustion(t *testing.T) {
	a := openT(t, t.TempDir(), "10.0.0.0/29") // .2 to .6: five addresses
	for i := range 5 {
		mustAlloc(t, a, owner(fmt.Sprint(i)))
	}
	_, err := a.Allocate(owner("full"))
	if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), "10.0.0.0/29") {
		t.Fatalf("Allocate on full range: got %v, want ErrExhausted naming 10.0.0.0/29", err)
	}
	if err := a.Release(owner("3")); err != nil {
		t.Fatal(err)
	}
	if got, want := mustAlloc(t, a, owner("full")), addrs("10.0.0.5"); !slices.Equal(got, want) {
		t.Errorf("Allocate after release = %v, want %v", got, want)
	}
}

// TestReleaseRotation checks that released addresses are not reused until the
// cursor has gone round the range.
func TestReleaseRotation(t *testing.T) {
	a := openT(t, t.TempDir(), "10.0.0.0/29", "fd00::/125") // v4 .2-.6, v6 ::2-::7
	mustAlloc(t, a, owner("a"))                             // .2 ::2
	mustAlloc(t, a, owner("b"))                             // .3 ::3
	if err := a.Release(owner("a")); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		owner string
		want  []string
	}{
		{"c", []string{"10.0.0.4", "fd00::4"}}, // not .2: the cursor moves on
		{"d", []string{"10.0.0.5", "fd00::5"}},
		{"e", []string{"10.0.0.6", "fd00::6"}},
		{"f", []string{"10.0.0.2", "fd00::7"}}, // v4 wraps round to the released .2
	}
	for _, s := range steps {
		if got, want := mustAlloc(t, a, owner(s.owner)), addrs(s.want...); !slices.Equal(got, want) {
			t.Errorf("Allocate(%s) = %v, want %v", s.owner, got, want)
		}
	}
}

// TestRelease checks that Release is idempotent and frees the owner.
func TestRelease(t *testing.T) {
	a := openT(t, t.TempDir(), "10.0.0.0/24")
	mustAlloc(t, a, owner("a"))
	for i := range 2 {
		if err := a.Release(owner("a")); err != nil {
			t.Fatalf("Release #%d: %v", i, err)
		}
	}
	if err := a.Release(owner("never")); err != nil {
		t.Errorf("Release of unknown owner: %v", err)
	}
	if al, ok := a.Get(owner("a")); ok {
		t.Errorf("Get after Release = %v, want none", al)
	}
}

// TestReleaseExcept checks CNI GC: everything not listed is released and
// returned, listed owners (known or not) are kept.
func TestReleaseExcept(t *testing.T) {
	dir := t.TempDir()
	a := openT(t, dir, "10.0.0.0/24")
	for _, c := range []string{"a", "b", "c", "d"} {
		mustAlloc(t, a, owner(c))
	}
	released, err := a.ReleaseExcept([]Owner{owner("b"), owner("d"), owner("unknown")})
	if err != nil {
		t.Fatal(err)
	}
	want := []Allocation{
		{Owner: owner("a"), Addrs: addrs("10.0.0.2")},
		{Owner: owner("c"), Addrs: addrs("10.0.0.4")},
	}
	if !equalAllocations(released, want) {
		t.Errorf("released %v, want %v", released, want)
	}
	wantLeft := []Allocation{
		{Owner: owner("b"), Addrs: addrs("10.0.0.3")},
		{Owner: owner("d"), Addrs: addrs("10.0.0.5")},
	}
	if got := a.List(); !equalAllocations(got, wantLeft) {
		t.Errorf("List = %v, want %v", got, wantLeft)
	}
	if released, err := a.ReleaseExcept([]Owner{owner("b"), owner("d")}); err != nil || len(released) != 0 {
		t.Errorf("second ReleaseExcept = %v, %v; want nothing", released, err)
	}
	a.Close()
	if got := openT(t, dir, "10.0.0.0/24").List(); !equalAllocations(got, wantLeft) {
		t.Errorf("List after reopen = %v, want %v", got, wantLeft)
	}
}

// TestPersistence checks that allocations and cursors survive Close/Open.
func TestPersistence(t *testing.T) {
	dir := t.TempDir()
	ranges := []string{"10.0.0.0/24", "fd00::/64"}
	a := openT(t, dir, ranges...)
	ka := mustAlloc(t, a, owner("keep"))
	mustAlloc(t, a, owner("gone"))
	if err := a.Release(owner("gone")); err != nil {
		t.Fatal(err)
	}
	before := a.List()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(owner("x")); !errors.Is(err, ErrClosed) {
		t.Errorf("Allocate after Close: got %v, want ErrClosed", err)
	}

	b := openT(t, dir, ranges...)
	if got := b.List(); !equalAllocations(got, before) {
		t.Errorf("List after reopen = %v, want %v", got, before)
	}
	if got := mustAlloc(t, b, owner("keep")); !slices.Equal(got, ka) {
		t.Errorf("Allocate(keep) after reopen = %v, want %v", got, ka)
	}
	// The cursor survived: the released .3 is skipped.
	if got, want := mustAlloc(t, b, owner("new")), addrs("10.0.0.4", "fd00::4"); !slices.Equal(got, want) {
		t.Errorf("Allocate(new) after reopen = %v, want %v", got, want)
	}
}

// TestLock checks that a directory can be open only once at a time.
func TestLock(t *testing.T) {
	dir := t.TempDir()
	a := openT(t, dir, "10.0.0.0/24")
	_, err := Open(dir, prefixes(t, "10.0.0.0/24"), Options{})
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("second Open: got %v, want ErrLocked naming the directory", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	openT(t, dir, "10.0.0.0/24")
}

// TestConcurrentAllocate checks that 100 concurrent calls get 100 distinct
// addresses per family and that all of them reach the disk.
func TestConcurrentAllocate(t *testing.T) {
	const n = 100
	dir := t.TempDir()
	ranges := []string{"10.0.0.0/24", "fd00::/64"}
	a := openT(t, dir, ranges...)
	results := make([][]netip.Addr, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			results[i], errs[i] = a.Allocate(owner(fmt.Sprintf("c%03d", i)))
		})
	}
	wg.Wait()
	seen := map[netip.Addr]int{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Allocate #%d: %v", i, errs[i])
		}
		for _, ip := range results[i] {
			if j, dup := seen[ip]; dup {
				t.Errorf("address %s given to #%d and #%d", ip, j, i)
			}
			seen[ip] = i
		}
	}
	if got, want := len(seen), 2*n; got != want {
		t.Errorf("%d distinct addresses, want %d", got, want)
	}
	a.Close()
	if got := len(openT(t, dir, ranges...).List()); got != n {
		t.Errorf("after reopen %d allocations, want %d", got, n)
	}
}

// TestWriteFailureKeepsState checks that a call whose write fails changes
// nothing, in memory or on disk. The write is made to fail by putting a
// directory where the temp file goes.
func TestWriteFailureKeepsState(t *testing.T) {
	dir := t.TempDir()
	a := openT(t, dir, "10.0.0.0/24")
	mustAlloc(t, a, owner("a")) // .2
	if err := os.Mkdir(filepath.Join(dir, stateTmpFile), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(owner("b")); err == nil {
		t.Fatal("Allocate succeeded although the state could not be written")
	}
	if err := a.Release(owner("a")); err == nil {
		t.Fatal("Release succeeded although the state could not be written")
	}
	if _, ok := a.Get(owner("b")); ok {
		t.Error("failed Allocate left an allocation in memory")
	}
	if _, ok := a.Get(owner("a")); !ok {
		t.Error("failed Release removed the allocation from memory")
	}
	if err := os.Remove(filepath.Join(dir, stateTmpFile)); err != nil {
		t.Fatal(err)
	}
	// The failed call did not move the cursor.
	if got, want := mustAlloc(t, a, owner("b")), addrs("10.0.0.3"); !slices.Equal(got, want) {
		t.Errorf("Allocate after failure = %v, want %v", got, want)
	}
}

// TestOpenRemovesTempFile checks that a leftover temp file from a crash is
// ignored and removed.
func TestOpenRemovesTempFile(t *testing.T) {
	dir := t.TempDir()
	tmp := filepath.Join(dir, stateTmpFile)
	if err := os.WriteFile(tmp, []byte(`{"version":1,"allocations":[{"contai`), 0o600); err != nil {
		t.Fatal(err)
	}
	a := openT(t, dir, "10.0.0.0/24")
	if len(a.List()) != 0 {
		t.Errorf("temp file content was loaded: %v", a.List())
	}
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temp file still there after Open: %v", err)
	}
}

// TestOpenCorruptState checks that every invalid state file makes Open fail
// with an error naming the file, leaving the file in place.
func TestOpenCorruptState(t *testing.T) {
	for _, tt := range corruptStates {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, stateFile)
			if err := os.WriteFile(path, []byte(tt.data), 0o600); err != nil {
				t.Fatal(err)
			}
			a, err := Open(dir, prefixes(t, "10.0.0.0/24", "fd00::/64"), Options{})
			if err == nil {
				a.Close()
				t.Fatalf("Open succeeded on %q", tt.data)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Open error %q, want it to name %s and contain %q", err, path, tt.wantErr)
			}
			if b, _ := os.ReadFile(path); string(b) != tt.data {
				t.Errorf("state file changed to %q", b)
			}
		})
	}
}

// TestForeignAddressesKept checks that allocations outside the configured
// ranges (the node's CIDR changed) are kept, returned and never re-issued.
func TestForeignAddressesKept(t *testing.T) {
	dir := t.TempDir()
	old := openT(t, dir, "10.9.0.0/24")
	oldAddrs := mustAlloc(t, old, owner("old"))
	old.Close()

	a := openT(t, dir, "10.0.0.0/24", "fd00::/64")
	if got := mustAlloc(t, a, owner("old")); !slices.Equal(got, oldAddrs) {
		t.Errorf("Allocate(old) = %v, want stored %v", got, oldAddrs)
	}
	if got, want := mustAlloc(t, a, owner("new")), addrs("10.0.0.2", "fd00::2"); !slices.Equal(got, want) {
		t.Errorf("Allocate(new) = %v, want %v", got, want)
	}
	if err := a.Release(owner("old")); err != nil {
		t.Fatal(err)
	}
	if got := len(a.List()); got != 1 {
		t.Errorf("List has %d allocations after release, want 1", got)
	}
}

func equalAllocations(a, b []Allocation) bool {
	return slices.EqualFunc(a, b, func(x, y Allocation) bool {
		return x.Owner == y.Owner && slices.Equal(x.Addrs, y.Addrs)
	})
}

// TestReserveCommit checks Reserve's two steps: the addresses are taken at
// once (Get, and the next Allocate picks others) but reach the disk only
// with commit.
func TestReserveCommit(t *testing.T) {
	dir := t.TempDir()
	a := openT(t, dir, "10.0.0.0/24")
	got, commit, err := a.Reserve(owner("a"))
	if err != nil {
		t.Fatal(err)
	}
	if want := addrs("10.0.0.2"); !slices.Equal(got, want) {
		t.Fatalf("Reserve = %v, want %v", got, want)
	}
	if al, ok := a.Get(owner("a")); !ok || !slices.Equal(al.Addrs, got) {
		t.Errorf("Get after Reserve = %v, %t", al, ok)
	}
	onDisk, err := readState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(onDisk.allocs) != 0 {
		t.Errorf("on disk before commit: %v", onDisk.allocs)
	}
	if err := commit(); err != nil {
		t.Fatal(err)
	}
	if onDisk, err = readState(dir); err != nil {
		t.Fatal(err)
	}
	if al, ok := onDisk.allocs[owner("a")]; !ok || !slices.Equal(al, got) {
		t.Errorf("on disk after commit: %v, want a with %v", onDisk.allocs, got)
	}
	// Another caller for the same owner gets the same addresses.
	if again := mustAlloc(t, a, owner("a")); !slices.Equal(again, got) {
		t.Errorf("Allocate of a reserved owner = %v, want %v", again, got)
	}
	if b := mustAlloc(t, a, owner("b")); !slices.Equal(b, addrs("10.0.0.3")) {
		t.Errorf("next Allocate = %v, want 10.0.0.3", b)
	}
	if onDisk, err = readState(dir); err != nil {
		t.Fatal(err)
	}
	if len(onDisk.allocs) != 2 {
		t.Errorf("on disk after commit: %v, want a and b", onDisk.allocs)
	}
}

// TestGroupCommit checks that reservations share writes: 100 of them
// committed at once take one write, every address is distinct and all are
// on disk; and 100 more, each reserved and committed by its own goroutine,
// all reach the disk with distinct addresses.
func TestGroupCommit(t *testing.T) {
	const n = 100
	dir := t.TempDir()
	a := openT(t, dir, "10.0.0.0/24")
	commits := make([]func() error, n)
	seen := map[netip.Addr]bool{}
	for i := range n {
		got, commit, err := a.Reserve(owner(fmt.Sprint("c", i)))
		if err != nil {
			t.Fatal(err)
		}
		if seen[got[0]] {
			t.Fatalf("%v reserved twice", got[0])
		}
		seen[got[0]] = true
		commits[i] = commit
	}
	before := stateWrites.Load()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, c := range commits {
		wg.Go(func() { errs <- c() })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	writes := stateWrites.Load() - before
	t.Logf("%d commits, %d writes", n, writes)
	if writes != 1 {
		t.Errorf("%d commits of reservations made before them took %d writes, want 1", n, writes)
	}
	onDisk, err := readState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(onDisk.allocs) != n {
		t.Errorf("%d allocations on disk, want %d", len(onDisk.allocs), n)
	}

	// Reservations and commits interleaved, as concurrent attaches make
	// them: commits wait for the write in progress and share the next.
	errs = make(chan error, n)
	for i := range n {
		wg.Go(func() {
			_, commit, err := a.Reserve(owner(fmt.Sprint("d", i)))
			if err == nil {
				err = commit()
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if onDisk, err = readState(dir); err != nil {
		t.Fatal(err)
	}
	used := map[netip.Addr]bool{}
	for _, addrs := range onDisk.allocs {
		for _, ip := range addrs {
			if used[ip] {
				t.Errorf("%v allocated twice on disk", ip)
			}
			used[ip] = true
		}
	}
	if len(onDisk.allocs) != 2*n {
		t.Errorf("%d allocations on disk after the interleaved ones, want %d", len(onDisk.allocs), 2*n)
	}
}
