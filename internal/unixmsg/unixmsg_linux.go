// Package unixmsg receives one record with file descriptors from a unix
// socket, the way both of shm-cni's socket protocols need it: the agent
// protocol (pkg/agentapi) and the sandbox dial (pkg/endpoint/shm).
package unixmsg

import (
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// Msg is one received record.
type Msg struct {
	// N is the record's full length; more than len(buf) when Truncated.
	N int
	// FDs are the received descriptors, close-on-exec; the caller owns them.
	FDs []int
	// Truncated is set when the record did not fit the buffer (MSG_TRUNC).
	Truncated bool
	// FDsTruncated is set when the kernel dropped descriptors (MSG_CTRUNC):
	// more than maxFDs were sent, or this process had no free slot.
	FDsTruncated bool
}

// Recv reads one record from conn into buf with recvmsg(2), receiving up to
// maxFDs descriptors with MSG_CMSG_CLOEXEC so that none leaks into a child
// process. It honours conn's read deadline. On error no descriptor is left
// open.
func Recv(conn *net.UnixConn, buf []byte, maxFDs int) (Msg, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return Msg{}, fmt.Errorf("recvmsg: %w", err)
	}
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	var n, oobn, flags int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			// MSG_TRUNC makes recvmsg return the record's real length.
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC|unix.MSG_TRUNC)
			if rerr != unix.EINTR {
				break
			}
		}
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return Msg{}, fmt.Errorf("recvmsg: %w", err)
	}
	fds, err := parseRights(oob[:oobn])
	if err != nil {
		Close(fds)
		return Msg{}, fmt.Errorf("recvmsg: %w", err)
	}
	return Msg{
		N:            n,
		FDs:          fds,
		Truncated:    flags&unix.MSG_TRUNC != 0 || n > len(buf),
		FDsTruncated: flags&unix.MSG_CTRUNC != 0,
	}, nil
}

// parseRights returns every descriptor of the SCM_RIGHTS messages in oob,
// including those found before a malformed message.
func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control messages: %w", err)
	}
	var fds []int
	var errs []error
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(m)
		if err != nil {
			errs = append(errs, fmt.Errorf("parse SCM_RIGHTS: %w", err))
			continue
		}
		fds = append(fds, got...)
	}
	return fds, errors.Join(errs...)
}

// Close closes every descriptor of fds.
func Close(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
