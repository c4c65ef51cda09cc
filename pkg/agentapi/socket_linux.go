package agentapi

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// recvResult is one received record.
type recvResult struct {
	// n is the record's full length; more than len(buf) when truncated.
	n int
	// files are the received descriptors, close-on-exec.
	files []*os.File
	// truncated is set when the record did not fit the buffer
	// (MSG_TRUNC).
	truncated bool
	// fdsTruncated is set when some descriptors were dropped by the kernel
	// (MSG_CTRUNC): more than fit the control buffer were sent, or this
	// process had no free descriptor slot.
	fdsTruncated bool
}

// recvMsg reads one record from conn into buf with recvmsg(2), receiving up
// to maxFDs descriptors with MSG_CMSG_CLOEXEC so none leaks into a child
// process. It honours conn's read deadline. On error no descriptor is left
// open.
func recvMsg(conn *net.UnixConn, buf []byte, maxFDs int) (recvResult, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return recvResult{}, fmt.Errorf("recvmsg: %w", err)
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
		return recvResult{}, fmt.Errorf("recvmsg: %w", err)
	}
	res := recvResult{
		n:            n,
		truncated:    flags&unix.MSG_TRUNC != 0 || n > len(buf),
		fdsTruncated: flags&unix.MSG_CTRUNC != 0,
	}
	fds, err := parseRights(oob[:oobn])
	for i, fd := range fds {
		res.files = append(res.files, os.NewFile(uintptr(fd), fmt.Sprintf("agentapi-fd%d", i)))
	}
	if err != nil {
		closeFiles(res.files)
		return recvResult{}, fmt.Errorf("recvmsg: %w", err)
	}
	return res, nil
}

// parseRights returns every descriptor in the SCM_RIGHTS messages of oob,
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

// peerCred returns the credentials of the process that connected conn, as
// recorded by the kernel at connect time (SO_PEERCRED).
func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", err)
	}
	if cerr != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return cred, nil
}

// closeFiles closes every file, ignoring errors: used on paths that already
// fail.
func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
