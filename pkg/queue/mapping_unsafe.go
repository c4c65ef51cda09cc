package queue

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mapping is one queue's four regions mapped into this process.
type mapping struct {
	data, txPipe, rxPipe, shared []byte
	// state is the notification word, the first 32 bits of shared.
	state *atomic.Uint32
}

// MapOptions say how strictly a queue's regions are checked before mapping.
type MapOptions struct {
	// RequireSeals refuses regions that are not sealed against shrinking.
	// A server must set it: a peer that shrinks a mapped region makes the
	// next access fault (SIGBUS).
	RequireSeals bool
}

// mapQueue maps the regions of q. Sizes come from the files themselves and
// are checked against the queue's limits.
func mapQueue(q QueueFDs, opts MapOptions) (*mapping, error) {
	m := &mapping{}
	ok := false
	defer func() {
		if !ok {
			m.unmap()
		}
	}()
	var err error
	if m.data, err = mapRegion("data", q.Data, pageSize, MaxDataSize, opts); err != nil {
		return nil, err
	}
	if m.txPipe, err = mapRegion("txPipe", q.TxPipe, pageSize, MaxPipeSize, opts); err != nil {
		return nil, err
	}
	if m.rxPipe, err = mapRegion("rxPipe", q.RxPipe, pageSize, MaxPipeSize, opts); err != nil {
		return nil, err
	}
	if m.shared, err = mapRegion("sharedData", q.SharedData, 8, SharedDataSize, opts); err != nil {
		return nil, err
	}
	m.state = (*atomic.Uint32)(unsafe.Pointer(&m.shared[0]))
	ok = true
	return m, nil
}

func mapRegion(name string, fd int, minSize, maxSize int64, opts MapOptions) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%s region (fd %d): fstat: %w", name, fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s region (fd %d): not a memory file (mode %#o)", name, fd, st.Mode&unix.S_IFMT)
	}
	if st.Size < minSize || st.Size > maxSize || st.Size%8 != 0 {
		return nil, fmt.Errorf("%s region (fd %d): size %d not a multiple of 8 in [%d, %d]", name, fd, st.Size, minSize, maxSize)
	}
	if opts.RequireSeals {
		s, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
		if err != nil {
			return nil, fmt.Errorf("%s region (fd %d): not a sealable memfd: %w", name, fd, err)
		}
		if s&unix.F_SEAL_SHRINK == 0 {
			return nil, fmt.Errorf("%s region (fd %d): not sealed against shrinking", name, fd)
		}
	}
	b, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%s region (fd %d): mmap %d bytes: %w", name, fd, st.Size, err)
	}
	return b, nil
}

func (m *mapping) unmap() {
	for _, b := range [][]byte{m.data, m.txPipe, m.rxPipe, m.shared} {
		if b != nil {
			unix.Munmap(b)
		}
	}
	*m = mapping{}
}
