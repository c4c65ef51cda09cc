package router

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// openTunTap opens /dev/net/tun and attaches it to the device name, creating
// a non-persistent device when none exists. mode is unix.IFF_TUN (L3, IP
// packets) or unix.IFF_TAP (Ethernet frames); frames carry no packet
// information header (IFF_NO_PI). The device lives in the network namespace of
// the calling thread, and goes away when the last fd attached to it closes.
// The caller owns the returned fd.
func openTunTap(name string, mode uint16) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun for %s: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("ifreq %s: %w", name, err)
	}
	ifr.SetUint16(mode | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	return fd, nil
}
