package agentapi

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/internal/unixmsg"
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

// recvMsg reads one record from conn into buf, receiving up to maxFDs
// descriptors (see unixmsg.Recv). On error no descriptor is left open.
func recvMsg(conn *net.UnixConn, buf []byte, maxFDs int) (recvResult, error) {
	m, err := unixmsg.Recv(conn, buf, maxFDs)
	if err != nil {
		return recvResult{}, err
	}
	res := recvResult{n: m.N, truncated: m.Truncated, fdsTruncated: m.FDsTruncated}
	for i, fd := range m.FDs {
		res.files = append(res.files, os.NewFile(uintptr(fd), fmt.Sprintf("agentapi-fd%d", i)))
	}
	return res, nil
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
