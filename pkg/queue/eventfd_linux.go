package queue

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Event is a queue's eventfd, opened for notifying and for waiting. Waiting
// parks the goroutine on Go's netpoller: a sleeping link holds no OS thread.
type Event struct {
	// f is a private duplicate of the eventfd. Immutable.
	f *os.File
	// fd is f's descriptor, used for non-blocking writes (f.Fd() would
	// switch the file to blocking mode). Immutable.
	fd int
}

// ErrClosed is returned by Wait after Interrupt.
var ErrClosed = errors.New("queue closed")

// OpenEvent duplicates eventfd fd into a new Event. The caller keeps fd.
func OpenEvent(fd int) (*Event, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup eventfd %d: %w", fd, err)
	}
	// O_NONBLOCK lives in the open file description shared with the peer;
	// gVisor's side polls before reading, so it works either way.
	if err := unix.SetNonblock(nfd, true); err != nil {
		unix.Close(nfd)
		return nil, fmt.Errorf("eventfd %d: set non-blocking: %w", fd, err)
	}
	return &Event{f: os.NewFile(uintptr(nfd), "eventfd"), fd: nfd}, nil
}

// Notify wakes the waiter. A full counter (the waiter is far behind) already
// means "wake up", so EAGAIN is not an error.
func (e *Event) Notify() {
	var one = [8]byte{1}
	for {
		_, err := unix.Write(e.fd, one[:])
		if err != unix.EINTR {
			return
		}
	}
}

// Wait blocks until the event is notified or Interrupt is called, and
// resets the counter.
func (e *Event) Wait() error {
	var buf [8]byte
	_, err := e.f.Read(buf[:])
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, os.ErrClosed) {
		return ErrClosed
	}
	return err
}

// Interrupt makes every current and future Wait return ErrClosed.
func (e *Event) Interrupt() { e.f.SetReadDeadline(time.Unix(1, 0)) }

// Close releases the event. Wait must have returned.
func (e *Event) Close() error { return e.f.Close() }
