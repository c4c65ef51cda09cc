package agent

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerHungUp reports whether the peer of conn closed its end (or sent
// something, which the dial protocol forbids and which counts as gone).
func peerHungUp(conn *net.UnixConn) bool {
	rc, err := conn.SyscallConn()
	if err != nil {
		return true
	}
	gone := true
	rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		n, err := unix.Poll(fds, 0)
		gone = err != nil || (n > 0 && fds[0].Revents != 0)
	})
	return gone
}
