package queue

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// seals are set on every region of a pair: its size can never change, so a
// peer cannot shrink a region under the other side's mapping (which would
// kill it with SIGBUS on the next access).
const seals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL

// NewPair creates a queue pair of the given sizes on memfd memory (nothing is
// left in any file system) and returns its descriptors, all close-on-exec.
// Every region is sealed against resizing. The caller owns the descriptors.
func NewPair(s Sizes) (Pair, error) {
	if err := s.Validate(); err != nil {
		return Pair{}, fmt.Errorf("queue sizes: %w", err)
	}
	p := Pair{TX: closedQueue(), RX: closedQueue()}
	ok := false
	defer func() {
		if !ok {
			p.Close()
		}
	}()
	var err error
	if p.TX, err = newQueue("tx", s); err != nil {
		return Pair{}, err
	}
	if p.RX, err = newQueue("rx", s); err != nil {
		return Pair{}, err
	}
	ok = true
	return p, nil
}

func closedQueue() QueueFDs {
	return QueueFDs{Data: -1, Event: -1, TxPipe: -1, RxPipe: -1, SharedData: -1}
}

func newQueue(name string, s Sizes) (q QueueFDs, err error) {
	q = closedQueue()
	defer func() {
		if err != nil {
			Pair{TX: q, RX: closedQueue()}.Close()
			q = closedQueue()
		}
	}()
	if q.Data, err = newRegion("shm-cni-"+name+"-data", s.DataSize, false); err != nil {
		return q, err
	}
	if q.Event, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return q, fmt.Errorf("eventfd for %s queue: %w", name, err)
	}
	if q.TxPipe, err = newRegion("shm-cni-"+name+"-txpipe", s.PipeSize, true); err != nil {
		return q, err
	}
	if q.RxPipe, err = newRegion("shm-cni-"+name+"-rxpipe", s.PipeSize, true); err != nil {
		return q, err
	}
	if q.SharedData, err = newRegion("shm-cni-"+name+"-shared", SharedDataSize, false); err != nil {
		return q, err
	}
	return q, nil
}

// newRegion creates a sealed memfd of size bytes. A ring starts with its
// first slot marked free, so that a consumer that maps it before the producer
// sees an empty ring.
func newRegion(name string, size uint64, ring bool) (int, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, fmt.Errorf("memfd_create %s: %w", name, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("ftruncate %s to %d bytes: %w", name, size, err)
	}
	if ring {
		var free [8]byte
		le.PutUint64(free[:], slotFree)
		if _, err := unix.Pwrite(fd, free[:], 0); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("initialise %s: %w", name, err)
		}
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("seal %s: %w", name, err)
	}
	return fd, nil
}
