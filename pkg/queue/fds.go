package queue

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// FDsPerQueue is the number of file descriptors of one queue.
const FDsPerQueue = 5

// FDsPerPair is the number of file descriptors of a queue pair.
const FDsPerPair = 2 * FDsPerQueue

// QueueFDs are the file descriptors of one queue.
type QueueFDs struct {
	Data, Event, TxPipe, RxPipe, SharedData int
}

// FDs returns the descriptors in wire order: Data, Event, TxPipe, RxPipe,
// SharedData, the order of gVisor's sharedmem.QueueConfig.FDs.
func (q QueueFDs) FDs() []int {
	return []int{q.Data, q.Event, q.TxPipe, q.RxPipe, q.SharedData}
}

// QueueFDsFrom is the inverse of QueueFDs.FDs.
func QueueFDsFrom(fds []int) (QueueFDs, error) {
	if len(fds) != FDsPerQueue {
		return QueueFDs{}, fmt.Errorf("queue: got %d file descriptors, want %d", len(fds), FDsPerQueue)
	}
	return QueueFDs{Data: fds[0], Event: fds[1], TxPipe: fds[2], RxPipe: fds[3], SharedData: fds[4]}, nil
}

// Pair are the file descriptors of a queue pair, named from the client's
// (the sandbox's) point of view: TX carries frames from client to server, RX
// from server to client. gVisor's sharedmem takes the same two configs on
// both sides.
type Pair struct {
	TX, RX QueueFDs
}

// FDs returns the pair's descriptors in wire order: TX's five, then RX's.
func (p Pair) FDs() []int { return append(p.TX.FDs(), p.RX.FDs()...) }

// PairFrom is the inverse of Pair.FDs.
func PairFrom(fds []int) (Pair, error) {
	if len(fds) != FDsPerPair {
		return Pair{}, fmt.Errorf("queue pair: got %d file descriptors, want %d", len(fds), FDsPerPair)
	}
	tx, _ := QueueFDsFrom(fds[:FDsPerQueue])
	rx, _ := QueueFDsFrom(fds[FDsPerQueue:])
	return Pair{TX: tx, RX: rx}, nil
}

// Close closes every descriptor of the pair.
func (p Pair) Close() error {
	var errs []error
	for _, fd := range p.FDs() {
		if fd >= 0 {
			if err := unix.Close(fd); err != nil {
				errs = append(errs, fmt.Errorf("close fd %d: %w", fd, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Dup returns a pair of new descriptors (close-on-exec) for the same queues.
func (p Pair) Dup() (Pair, error) {
	fds := p.FDs()
	out := make([]int, 0, len(fds))
	for _, fd := range fds {
		nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			for _, o := range out {
				unix.Close(o)
			}
			return Pair{}, fmt.Errorf("dup fd %d: %w", fd, err)
		}
		out = append(out, nfd)
	}
	return PairFrom(out)
}
