package node

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestPruneGVisorCopies: the most recently used patched copies stay
// whatever their age, older unused ones and half-made ones go once idle,
// and nothing else in the cache directory is touched.
func TestPruneGVisorCopies(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	for name, age := range map[string]time.Duration{
		"gvisor-aa":         1 * time.Hour,
		"gvisor-bb":         48 * time.Hour,
		"gvisor-cc":         72 * time.Hour,
		"gvisor-dd":         96 * time.Hour,
		"gvisor-ee":         2 * time.Hour,
		"gvisor-ff.tmp-123": 30 * time.Hour, // half made, idle: goes
		"gvisor-gg.tmp-456": time.Minute,    // being made: stays
		"other":             500 * time.Hour,
	} {
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	if err := pruneGVisorCopies(dir, 3, now.Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	// By use: aa (1 h), ee (2 h), bb (48 h) kept; cc (72 h) and dd (96 h)
	// beyond the three and idle.
	want := []string{"gvisor-aa", "gvisor-bb", "gvisor-ee", "gvisor-gg.tmp-456", "other"}
	if !slices.Equal(got, want) {
		t.Errorf("left %v, want %v", got, want)
	}
	// A copy used 3 h ago makes bb the fourth by use, idle: it goes; the
	// new one is third and stays.
	p := filepath.Join(dir, "gvisor-hh")
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(p, now.Add(-3*time.Hour), now.Add(-3*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := pruneGVisorCopies(dir, 3, now.Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Errorf("a copy used 3 h ago, third by use, was removed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "gvisor-bb")); err == nil {
		t.Error("gvisor-bb, fourth by use and idle for 48 h, stayed")
	}
	// Within the idle time, one beyond the three stays.
	if err := pruneGVisorCopies(dir, 1, now.Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "gvisor-ee")); err != nil {
		t.Errorf("gvisor-ee, used 2 h ago, was removed: %v", err)
	}
}
