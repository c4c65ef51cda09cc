package queue

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// CheckPair checks that the descriptors of p, received from another
// process, are a pair of sizes s: every region a regular (memory) file of
// exactly the size s gives it, every event an eventfd. Mapping (NewReceiver,
// NewFiller) checks that a region is safe to use; CheckPair that the pair is
// the one announced, so that a link does not start on regions of other
// sizes or fail later on an event nobody can wait on. Errors name the queue
// and the region or event, and the Sizes field a size comes from.
func CheckPair(p Pair, s Sizes) error {
	var errs []error
	for _, q := range []struct {
		name string
		fds  QueueFDs
	}{{"tx", p.TX}, {"rx", p.RX}} {
		for _, r := range []struct {
			name, field string
			fd          int
			size        uint64
		}{
			{"data", "dataSize", q.fds.Data, s.DataSize},
			{"txPipe", "pipeSize", q.fds.TxPipe, s.PipeSize},
			{"rxPipe", "pipeSize", q.fds.RxPipe, s.PipeSize},
			{"sharedData", "the shared-data page size", q.fds.SharedData, SharedDataSize},
		} {
			var st unix.Stat_t
			switch err := unix.Fstat(r.fd, &st); {
			case err != nil:
				errs = append(errs, fmt.Errorf("%s %s region (fd %d): fstat: %w", q.name, r.name, r.fd, err))
			case st.Mode&unix.S_IFMT != unix.S_IFREG:
				errs = append(errs, fmt.Errorf("%s %s region (fd %d): not a memory file (mode %#o)", q.name, r.name, r.fd, st.Mode&unix.S_IFMT))
			case st.Size < 0 || uint64(st.Size) != r.size:
				errs = append(errs, fmt.Errorf("%s %s region (fd %d): size %d, want %d (%s)", q.name, r.name, r.fd, st.Size, r.size, r.field))
			}
		}
		if err := checkEventFD(q.fds.Event); err != nil {
			errs = append(errs, fmt.Errorf("%s event (fd %d): %w", q.name, q.fds.Event, err))
		}
	}
	return errors.Join(errs...)
}

// checkEventFD reports whether fd is an eventfd, as /proc names it.
func checkEventFD(fd int) error {
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return fmt.Errorf("not an open descriptor: %w", err)
	}
	if link != "anon_inode:[eventfd]" {
		return fmt.Errorf("%s is not an eventfd", strconv.Quote(link))
	}
	return nil
}
