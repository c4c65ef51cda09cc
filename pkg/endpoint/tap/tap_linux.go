package tap

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/rawfile"

	"github.com/shm-cni/shm-cni/pkg/endpoint"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// dupTAP duplicates the caller's TUN/TAP fd for the endpoint to own and
// describes its device. The duplicate is close-on-exec and non-blocking;
// O_NONBLOCK belongs to the open file description, which the caller's fd
// shares, so the caller's fd becomes non-blocking too.
func dupTAP(fd int) (int, tuntap.Info, error) {
	info, err := tuntap.Inspect(fd)
	if err != nil {
		return -1, tuntap.Info{}, err
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, tuntap.Info{}, fmt.Errorf("dup tap %q fd %d: %w", info.Name, fd, err)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return -1, tuntap.Info{}, fmt.Errorf("set tap %q fd non-blocking: %w", info.Name, err)
	}
	return dup, info, nil
}

// writeIovec writes one frame with a single non-blocking writev. A TUN/TAP
// write takes the whole frame or nothing.
func writeIovec(fd int, iovs []unix.Iovec) unix.Errno {
	return rawfile.NonBlockingWriteIovec(fd, iovs)
}

// isDeviceGone reports whether a read error means the device is gone for
// good: it was deleted (EBADFD), went away with its namespace, or the fd
// was closed.
func isDeviceGone(err error) bool {
	return errors.Is(err, unix.EBADFD) || errors.Is(err, unix.EIO) ||
		errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODEV) ||
		errors.Is(err, unix.EBADF) || errors.Is(err, os.ErrClosed)
}

// tapReader reads frames from a TUN/TAP fd through the runtime poller
// (deadlines and all) with readv: into a pooled 64 KiB buffer.View, so that
// a frame that fits (every TCP super-packet the kernel's 64 KiB GSO limit
// makes, headers included) can be handed to the stack without a copy
// (take), and into a tail buffer for the few bytes of the largest frames,
// which are then copied into one contiguous buffer.
//
// A tapReader belongs to the reader goroutine.
type tapReader struct {
	rc   syscall.RawConn
	view *buffer.View // the current pooled buffer; nil after take
	tail []byte       // the bytes of a frame beyond view's chunk
	big  []byte       // a frame that did not fit view, made contiguous
	n    int          // length of the last frame read into view

	// readFn is the readv rc.Read runs, made once so that a read does not
	// allocate a closure; it reads into iovs and leaves its result in
	// got and errno.
	readFn func(fd uintptr) bool
	poll   endpoint.Poll
	iovs   [2]unix.Iovec
	got    int
	errno  unix.Errno
}

// tapReadChunk is the pooled chunk size frames are read into: gVisor's
// largest pooled chunk (buffer.MaxChunkSize, 64 KiB).
const tapReadChunk = buffer.MaxChunkSize

func newTAPReader(f *os.File, poll time.Duration) (*tapReader, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &tapReader{
		poll: endpoint.NewPoll(poll),
		rc:   rc,
		tail: make([]byte, readBufSize-tapReadChunk),
		big:  make([]byte, readBufSize),
	}
	var fd int
	try := func() bool {
		r.got, r.errno = readv(fd, r.iovs[:])
		return r.errno != unix.EAGAIN
	}
	r.readFn = func(rfd uintptr) bool {
		fd = int(rfd)
		if try() || r.poll.Wait(try, nil) {
			r.poll.Arrived()
			return true
		}
		return false
	}
	return r, nil
}

// read reads one frame and returns it as one slice, valid until the next
// read or take. It returns io.EOF at end of file, os.ErrDeadlineExceeded
// when a read deadline passed, and the kernel's error otherwise.
func (r *tapReader) read() ([]byte, error) {
	if r.view == nil {
		r.view = buffer.NewViewSize(tapReadChunk)
	}
	head := r.view.AsSlice()
	r.iovs = [2]unix.Iovec{{Base: &head[0]}, {Base: &r.tail[0]}}
	r.iovs[0].SetLen(len(head))
	r.iovs[1].SetLen(len(r.tail))
	r.got, r.errno = 0, 0
	err := r.rc.Read(r.readFn)
	n := r.got
	switch {
	case err != nil:
		return nil, err
	case r.errno != 0:
		return nil, r.errno
	case n == 0:
		return nil, io.EOF
	case n <= len(head):
		r.n = n
		return head[:n], nil
	}
	r.n = 0
	copy(r.big, head)
	copy(r.big[len(head):], r.tail[:n-len(head)])
	return r.big[:n], nil
}

// take hands over the bytes [off, off+n) of the frame last read, when that
// frame is in the pooled view, as a view the caller owns; the next read
// gets a fresh one. It returns nil when the frame was copied (read's big
// buffer): the caller copies.
func (r *tapReader) take(off, n int) *buffer.View {
	if r.view == nil || r.n == 0 || off < 0 || off+n > r.n {
		return nil
	}
	v := r.view
	r.view = nil
	v.CapLength(off + n)
	v.TrimFront(off)
	return v
}

// release returns the pooled view.
func (r *tapReader) release() {
	if r.view != nil {
		r.view.Release()
		r.view = nil
	}
}
