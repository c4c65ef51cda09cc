package ipam

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// corruptStates are state files that parseState must reject; they seed
// FuzzParseState too.
var corruptStates = []struct {
	name, data, wantErr string
}{
	{"empty file", ``, "decode"},
	{"garbage", "\x00\x01garbage", "decode"},
	{"truncated", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["10.0.0.2"]}`, "decode"},
	{"trailing data", `{"version":1} {}`, "trailing data"},
	{"no version", `{"allocations":[]}`, "unsupported version 0"},
	{"future version", `{"version":2}`, "unsupported version 2"},
	{"unknown field", `{"version":1,"extra":true}`, "unknown field"},
	{"bad address", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["10.0.0.256"]}]}`, "10.0.0.256"},
	{"empty address", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":[""]}]}`, "not a plain"},
	{"zoned address", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["fe80::1%eth0"]}]}`, "not a plain"},
	{"v4-mapped address", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["::ffff:10.0.0.2"]}]}`, "not a plain"},
	{"no addresses", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":[]}]}`, "0 addresses"},
	{"three addresses", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["10.0.0.2","fd00::2","fd00::3"]}]}`, "3 addresses"},
	{"v6 before v4", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["fd00::2","10.0.0.2"]}]}`, "one IPv4 then one IPv6"},
	{"two v4", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["10.0.0.2","10.0.0.3"]}]}`, "one IPv4 then one IPv6"},
	{"empty container ID", `{"version":1,"allocations":[{"containerID":"","ifName":"eth0","addrs":["10.0.0.2"]}]}`, "must not be empty"},
	{"duplicate owner", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["10.0.0.2"]},{"containerID":"a","ifName":"eth0","addrs":["10.0.0.3"]}]}`, "duplicate owner a/eth0"},
	{"duplicate address", `{"version":1,"allocations":[{"containerID":"a","ifName":"eth0","addrs":["10.0.0.2"]},{"containerID":"b","ifName":"eth0","addrs":["10.0.0.2"]}]}`, "address 10.0.0.2 also allocated to a/eth0"},
	{"cursor outside range", `{"version":1,"cursors":{"10.0.0.0/24":"10.0.1.1"}}`, "outside the range"},
	{"cursor non-canonical range", `{"version":1,"cursors":{"10.0.0.1/24":"10.0.0.1"}}`, "not canonical"},
	{"cursor bad range", `{"version":1,"cursors":{"10.0.0.0/33":"10.0.0.1"}}`, "decode"},
}

// TestParseStateRejects checks parseState directly on the corrupt table.
func TestParseStateRejects(t *testing.T) {
	for _, tt := range corruptStates {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseState([]byte(tt.data))
			if err == nil {
				t.Fatalf("parseState(%q) succeeded", tt.data)
			}
			if !bytes.Contains([]byte(err.Error()), []byte(tt.wantErr)) {
				t.Errorf("parseState(%q) = %q, want it to contain %q", tt.data, err, tt.wantErr)
			}
		})
	}
}

// realStates drives allocators through a few scenarios and returns the state
// files they wrote.
func realStates(t testing.TB, dir string) [][]byte {
	t.Helper()
	scenarios := []struct {
		ranges  []string
		owners  int
		release []int
	}{
		{[]string{"10.0.0.0/24"}, 3, nil},
		{[]string{"fd00:1::/64"}, 2, []int{0}},
		{[]string{"10.0.0.0/29", "fd00::/120"}, 5, []int{1, 3}},
		{[]string{"10.0.0.0/30", "fd00::/126"}, 1, []int{0}},
	}
	var out [][]byte
	for i, s := range scenarios {
		d := filepath.Join(dir, fmt.Sprint(i))
		a, err := Open(d, prefixes(t, s.ranges...), Options{})
		if err != nil {
			t.Fatal(err)
		}
		for j := range s.owners {
			if _, err := a.Allocate(Owner{ContainerID: fmt.Sprintf("ctr-%d", j), IfName: "eth0"}); err != nil {
				t.Fatal(err)
			}
		}
		for _, j := range s.release {
			if err := a.Release(Owner{ContainerID: fmt.Sprintf("ctr-%d", j), IfName: "eth0"}); err != nil {
				t.Fatal(err)
			}
		}
		a.Close()
		b, err := os.ReadFile(filepath.Join(d, stateFile))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// TestStateRoundTrip checks that real state files parse and re-encode to the
// same bytes.
func TestStateRoundTrip(t *testing.T) {
	for i, b := range realStates(t, t.TempDir()) {
		s, err := parseState(b)
		if err != nil {
			t.Fatalf("state %d: parseState: %v\n%s", i, err, b)
		}
		got, err := marshalState(s)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, b) {
			t.Errorf("state %d: re-encoded\n%s\nwant\n%s", i, got, b)
		}
	}
}

// FuzzParseState feeds arbitrary bytes to the state-file parser: it must not
// panic, and whatever it accepts must satisfy the allocator's invariants and
// survive an encode/parse round trip unchanged.
func FuzzParseState(f *testing.F) {
	for _, b := range realStates(f, f.TempDir()) {
		f.Add(b)
	}
	for _, tt := range corruptStates {
		f.Add([]byte(tt.data))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := parseState(b)
		if err != nil {
			return
		}
		n := 0
		for o, addrs := range s.allocs {
			if validateOwner(o) != nil || checkAddrs(addrs) != nil {
				t.Fatalf("accepted invalid allocation %s %v", o, addrs)
			}
			for _, a := range addrs {
				if s.used[a] != o {
					t.Fatalf("address %s maps to %s, want %s", a, s.used[a], o)
				}
				n++
			}
		}
		if n != len(s.used) {
			t.Fatalf("%d allocated addresses but %d in the used index", n, len(s.used))
		}
		enc, err := marshalState(s)
		if err != nil {
			t.Fatal(err)
		}
		s2, err := parseState(enc)
		if err != nil {
			t.Fatalf("re-parse of encoded state: %v\n%s", err, enc)
		}
		enc2, err := marshalState(s2)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(enc, enc2) {
			t.Fatalf("round trip changed the state:\n%s\n%s", enc, enc2)
		}
	})
}
