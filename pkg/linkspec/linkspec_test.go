package linkspec

import (
	"strings"
	"testing"
)

// TestCheckIfName: the names the kernel's dev_valid_name takes pass, the
// others fail.
func TestCheckIfName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"eth0", true},
		{"a", true},
		{"123456789012345", true},
		{"1234567890123456", false},
		{"", false},
		{".", false},
		{"..", false},
		{"...", true},
		{"eth/0", false},
		{"eth:0", false},
		{"eth 0", false},
		{"eth\t0", false},
		{"eth\v0", false},
		{"eth\x000", false},
		{"eth\u00a00", false},
	} {
		err := CheckIfName(tc.name)
		if got := err == nil; got != tc.ok {
			t.Errorf("CheckIfName(%q) = %v, want ok %t", tc.name, err, tc.ok)
		}
	}
}

// TestCheckMTU: the bounds are inclusive and the error names them.
func TestCheckMTU(t *testing.T) {
	for _, tc := range []struct {
		mtu, min int
		want     string
	}{
		{MinMTU, MinMTU, ""},
		{MaxMTU, MinMTU, ""},
		{MinMTU - 1, MinMTU, "67 is not in 68..65535"},
		{MaxMTU + 1, MinMTU, "65536 is not in 68..65535"},
		{1279, MinShmMTU, "1279 is not in 1280..65535"},
		{1000, MinNodeMTU(false), ""},
		{1000, MinNodeMTU(true), "1000 is not in 1280..65535"},
		{575, MinNodeMTU(false), "575 is not in 576..65535"},
	} {
		err := CheckMTU(tc.mtu, tc.min)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("CheckMTU(%d, %d) = %v, want nil", tc.mtu, tc.min, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("CheckMTU(%d, %d) = %v, want %q", tc.mtu, tc.min, err, tc.want)
		}
	}
}

// TestKeyString: a key prints as containerID/ifName.
func TestKeyString(t *testing.T) {
	if got, want := (Key{"abc", "eth0"}).String(), "abc/eth0"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

// TestHostVethName: a veth link's host side is named from its key alone,
// HostVethPrefix first, as long as an interface name may be, and differs
// for another container or interface.
func TestHostVethName(t *testing.T) {
	k := Key{"0123456789abcdef", "eth0"}
	got := HostVethName(k)
	if err := CheckIfName(got); err != nil || len(got) != MaxIfNameLen || !strings.HasPrefix(got, HostVethPrefix) {
		t.Errorf("HostVethName(%v) = %q (%v), want %d bytes starting %q", k, got, err, MaxIfNameLen, HostVethPrefix)
	}
	if again := HostVethName(k); again != got {
		t.Errorf("HostVethName(%v) = %q, then %q", k, got, again)
	}
	for _, o := range []Key{{"0123456789abcdeg", "eth0"}, {"0123456789abcdef", "eth1"}} {
		if HostVethName(o) == got {
			t.Errorf("HostVethName(%v) = HostVethName(%v) = %q", o, k, got)
		}
	}
}

// TestHostIfbName: a veth link's ifb device is named as its host side,
// with HostIfbPrefix for HostVethPrefix, so that neither name is ever the
// other's.
func TestHostIfbName(t *testing.T) {
	k := Key{"0123456789abcdef", "eth0"}
	got, veth := HostIfbName(k), HostVethName(k)
	if err := CheckIfName(got); err != nil || len(got) != MaxIfNameLen || !strings.HasPrefix(got, HostIfbPrefix) {
		t.Errorf("HostIfbName(%v) = %q (%v), want %d bytes starting %q", k, got, err, MaxIfNameLen, HostIfbPrefix)
	}
	if got[len(HostIfbPrefix):] != veth[len(HostVethPrefix):] || got == veth {
		t.Errorf("HostIfbName(%v) = %q, HostVethName %q: want the same digest after other prefixes", k, got, veth)
	}
}
