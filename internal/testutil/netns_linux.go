package testutil

import (
	"errors"
	"io/fs"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
)

// NewNS creates a fresh network namespace (everything down, loopback
// included), closed and removed when t ends. A test may remove it itself
// first, to play a pod whose namespace went away.
func NewNS(t testing.TB) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			if _, serr := os.Stat(n.Path()); !errors.Is(serr, fs.ErrNotExist) {
				t.Errorf("unmount netns: %v", err)
			}
		}
	})
	return n
}

// Do runs f inside n, failing t on error.
func Do(t testing.TB, n ns.NetNS, f func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}
