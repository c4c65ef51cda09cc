package tuntap

import (
	"errors"
	"fmt"
	"net"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/testutil"
)

// TestOpen checks creating, re-opening and inspecting devices.
func TestOpen(t *testing.T) {
	testutil.RequireRoot(t)
	netns := testutil.NewNS(t)
	err := netns.Do(func(ns.NetNS) error {
		exists := func(name string) bool {
			_, err := net.InterfaceByName(name)
			return err == nil
		}
		// A persistent device outlives its fd and is re-opened by name.
		persist := Options{VnetHdr: true, Offload: true, Persist: true}
		f1, err := Open("ptap0", persist)
		if err != nil {
			return err
		}
		if info, err := Inspect(rawFD(t, f1)); err != nil || info != (Info{Name: "ptap0", VnetHdr: true, VnetHdrSize: VnetHdrLen, Persist: true}) {
			t.Errorf("Inspect = %+v, %v", info, err)
		}
		if fl, err := unix.FcntlInt(uintptr(rawFD(t, f1)), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
			t.Errorf("file status flags %#x, %v: want O_NONBLOCK", fl, err)
		}
		if fl, err := unix.FcntlInt(uintptr(rawFD(t, f1)), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
			t.Errorf("fd flags %#x, %v: want FD_CLOEXEC", fl, err)
		}
		if _, err := Open("ptap0", persist); !errors.Is(err, unix.EBUSY) {
			t.Errorf("second open while the first is open: %v, want EBUSY", err)
		}
		f1.Close()
		if !exists("ptap0") {
			t.Errorf("persistent device gone after its fd was closed")
		}
		f2, err := Open("ptap0", Options{MustExist: true})
		if err != nil {
			return fmt.Errorf("re-open persistent device: %w", err)
		}
		// The flags follow the new request; persistence stays.
		if info, err := Inspect(rawFD(t, f2)); err != nil || info.VnetHdr || !info.Persist {
			t.Errorf("re-opened without vnet header: Inspect = %+v, %v", info, err)
		}
		if _, err := Open("ptap0", Options{TUN: true}); !errors.Is(err, unix.EINVAL) {
			t.Errorf("open a TAP device as TUN: %v, want EINVAL", err)
		}
		f2.Close()
		link, err := netlink.LinkByName("ptap0")
		if err != nil {
			return err
		}
		if err := netlink.LinkDel(link); err != nil {
			return err
		}

		if _, err := Open("absent0", Options{MustExist: true}); !errors.Is(err, unix.ENODEV) {
			t.Errorf("MustExist on a missing device: %v, want ENODEV", err)
		}
		if exists("absent0") {
			t.Errorf("MustExist created a device")
		}
		if _, err := Open("bad0", Options{Offload: true}); err == nil {
			t.Errorf("offload without vnet header accepted")
		}
		if _, err := Open("a-name-longer-than-15", Options{}); err == nil {
			t.Errorf("over-long name accepted")
		}
		// A device that does not persist dies with its fd.
		f3, err := Open("eph0", Options{TUN: true})
		if err != nil {
			return err
		}
		if !exists("eph0") {
			t.Errorf("new device not visible")
		}
		f3.Close()
		if exists("eph0") {
			t.Errorf("non-persistent device outlived its fd")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestOpenExclusive checks that Exclusive creates a device and refuses
// every existing interface of the name with EEXIST, attached or not, TAP
// or not, leaving it as it was.
func TestOpenExclusive(t *testing.T) {
	testutil.RequireRoot(t)
	netns := testutil.NewNS(t)
	err := netns.Do(func(ns.NetNS) error {
		excl := Options{VnetHdr: true, Offload: true, Persist: true, Exclusive: true}
		f, err := Open("xtap0", excl)
		if err != nil {
			return fmt.Errorf("create: %w", err)
		}
		if info, err := Inspect(rawFD(t, f)); err != nil || info != (Info{Name: "xtap0", VnetHdr: true, VnetHdrSize: VnetHdrLen, Persist: true}) {
			t.Errorf("Inspect = %+v, %v", info, err)
		}
		if _, err := Open("xtap0", excl); !errors.Is(err, unix.EEXIST) {
			t.Errorf("exclusive open of an attached device: %v, want EEXIST", err)
		}
		f.Close()
		if _, err := Open("xtap0", excl); !errors.Is(err, unix.EEXIST) {
			t.Errorf("exclusive open of a detached persistent device: %v, want EEXIST", err)
		}
		if _, err := Open("lo", Options{Exclusive: true}); !errors.Is(err, unix.EEXIST) {
			t.Errorf("exclusive open of lo: %v, want EEXIST", err)
		}
		l, err := netlink.LinkByName("xtap0")
		if err != nil {
			return fmt.Errorf("the refused opens removed the device: %w", err)
		}
		if l.Type() != "tuntap" {
			t.Errorf("xtap0 is a %s device", l.Type())
		}
		if _, err := Open("ytap0", Options{MustExist: true, Exclusive: true}); err == nil {
			t.Errorf("MustExist with Exclusive accepted")
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// rawFD returns f's descriptor without switching it to blocking mode (as
// f.Fd would).
func rawFD(t *testing.T, f *os.File) int {
	t.Helper()
	sc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	if err := sc.Control(func(x uintptr) { fd = int(x) }); err != nil {
		t.Fatal(err)
	}
	return fd
}
