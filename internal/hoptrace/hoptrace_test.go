package hoptrace

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// dir holds this process's trace file, mapped once for all tests.
var dir string

func TestMain(m *testing.M) {
	Mark(Rx) // before Start: nothing, no crash
	var err error
	if dir, err = os.MkdirTemp("", "hoptrace"); err != nil {
		panic(err)
	}
	if err := Start(dir); err != nil {
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func TestRecord(t *testing.T) {
	f, err := Open(dir, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	Mark(Rx) // recording off
	before, _ := f.Records()
	f.Record(true)
	for _, p := range []Point{Rx, Delivered, Read, App, Tx, Sleep, Wake} {
		Mark(p)
	}
	f.Record(false)
	Mark(Tx)
	recs, lost := f.Records()
	if lost != 0 {
		t.Fatalf("lost %d", lost)
	}
	recs = recs[len(before):]
	want := []Point{Rx, Delivered, Read, App, Tx, Sleep, Wake}
	if len(recs) != len(want) {
		t.Fatalf("got %d records %v, want %d", len(recs), recs, len(want))
	}
	for i, r := range recs {
		if r.Point != want[i] {
			t.Errorf("record %d: point %d, want %d", i, r.Point, want[i])
		}
		if r.At <= 0 || (i > 0 && r.At < recs[i-1].At) {
			t.Errorf("record %d: time %d after %v", i, r.At, recs[:i])
		}
	}
}

func TestRingKeepsNewest(t *testing.T) {
	f, err := Open(dir, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs0, _ := f.Records()
	f.Record(true)
	for range Records + 10 {
		Mark(App)
	}
	f.Record(false)
	recs, lost := f.Records()
	if len(recs) != Records || lost != uint64(len(recs0))+10 {
		t.Fatalf("got %d records, %d lost; want %d, %d", len(recs), lost, Records, len(recs0)+10)
	}
	for i, r := range recs {
		if r.Point != App {
			t.Fatalf("record %d: point %d", i, r.Point)
		}
	}
}

func TestOpenRefusesOtherFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(dir, 1<<30); err == nil {
		t.Error("opened a missing file")
	}
	p := filepath.Join(dir, strconv.Itoa(4242))
	if err := os.WriteFile(p, []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, 4242); err == nil {
		t.Error("opened a file of the wrong size")
	}
}
