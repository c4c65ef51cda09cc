package ipam

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// lockDir takes an exclusive, non-blocking flock on dir's lock file. The lock
// belongs to the returned file's open file description: it conflicts with any
// other Open of the directory, in this process or another, and the kernel
// drops it when the file is closed or the process dies.
func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock ipam state dir %s: %w", dir, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock ipam state dir %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("lock ipam state dir %s: %w", dir, err)
	}
	return f, nil
}
