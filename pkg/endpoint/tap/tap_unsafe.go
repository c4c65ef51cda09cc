//go:build linux

package tap

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// readv is one non-blocking readv(2) on fd: the fd is O_NONBLOCK, so it
// never blocks and needs no scheduler hand-off (RawSyscall).
func readv(fd int, iovs []unix.Iovec) (int, unix.Errno) {
	n, _, errno := unix.RawSyscall(unix.SYS_READV, uintptr(fd), uintptr(unsafe.Pointer(&iovs[0])), uintptr(len(iovs)))
	return int(n), errno
}
