// Package hoptrace records when a process's frames pass a few points of
// their path (a link's receive and transmit, a receive loop's sleep and
// wake-up, an application's write), for the benchmark's trace of a round
// trip through several processes (test/bench, the trace case).
//
// It is off unless the process starts with SHM_HOPTRACE_DIR in its
// environment. Then the process maps DIR/<pid> (a header and a ring of
// records) and Mark records into it while the file's header says so: the
// benchmark switches recording on around the round trips it traces and
// reads the records afterwards. The clock is CLOCK_MONOTONIC, the same in
// every process of the machine. A Mark when off is an atomic load.
package hoptrace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// EnvDir is the environment variable that turns tracing on.
const EnvDir = "SHM_HOPTRACE_DIR"

// Point is a point of a frame's path.
type Point uint32

const (
	// Rx: a link's receive loop took frames from its ring.
	Rx Point = 1 + iota
	// Tx: a link was given frames to send.
	Tx
	// Sleep: a receive loop found its ring empty and sleeps on its eventfd.
	Sleep
	// Wake: a sleeping receive loop was woken.
	Wake
	// App: an application wrote a request or a reply.
	App
	// Delivered: a link's receive loop handed its frames to the netstack
	// (which ran what it runs inline, up to queueing them for TCP).
	Delivered
	// Read: an application's read returned what it waited for.
	Read
)

// The file: a header of headerSize bytes (enabled flag at 0, the count of
// records written at 8), then Records records of 16 bytes (the time in
// nanoseconds, the point).
const (
	headerSize = 64
	recordSize = 16
	// Records is the ring's length: the newest Records records are kept.
	Records  = 1 << 16
	fileSize = headerSize + Records*recordSize
)

var (
	file string         // the mapped file's path
	mem  []byte         // the mapped file; nil when off
	on   *atomic.Uint32 // in mem's header
	next *atomic.Uint64 // in mem's header
)

func init() {
	if dir := os.Getenv(EnvDir); dir != "" {
		if err := Start(dir); err != nil {
			fmt.Fprintf(os.Stderr, "hoptrace: %v (tracing off)\n", err)
		}
	}
}

// Start maps this process's trace file in dir, recording off, as the
// environment variable does at start (for a process that sets it itself:
// the benchmark). Only the first call maps a file.
func Start(dir string) error {
	if mem != nil {
		return nil
	}
	file = filepath.Join(dir, strconv.Itoa(os.Getpid()))
	m, err := mapFile(file, true)
	if err != nil {
		return err
	}
	mem = m
	on = (*atomic.Uint32)(unsafe.Pointer(&mem[0]))
	next = (*atomic.Uint64)(unsafe.Pointer(&mem[8]))
	return nil
}

func mapFile(path string, create bool) ([]byte, error) {
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if create {
		if err := f.Truncate(fileSize); err != nil {
			return nil, err
		}
	} else if st, err := f.Stat(); err != nil {
		return nil, err
	} else if st.Size() != fileSize {
		return nil, fmt.Errorf("%s: %d bytes, want %d", path, st.Size(), fileSize)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, fileSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	return m, nil
}

// nanotime is the runtime's CLOCK_MONOTONIC reading (through the vDSO).
//
//go:linkname nanotime runtime.nanotime
func nanotime() int64

// Mark records that the process's frames passed p now, when recording.
func Mark(p Point) {
	if mem == nil || on.Load() == 0 {
		return
	}
	i := next.Add(1) - 1
	off := headerSize + (i%Records)*recordSize
	binary.LittleEndian.PutUint64(mem[off:], uint64(nanotime()))
	binary.LittleEndian.PutUint64(mem[off+8:], uint64(p))
}

// Record is one recorded point.
type Record struct {
	At    int64 // CLOCK_MONOTONIC, nanoseconds
	Point Point
}

// File is another process's trace file, as the benchmark reads it.
type File struct{ mem []byte }

// Open maps the trace file of process pid in dir.
func Open(dir string, pid int) (*File, error) {
	m, err := mapFile(filepath.Join(dir, strconv.Itoa(pid)), false)
	if err != nil {
		return nil, err
	}
	return &File{mem: m}, nil
}

// Record switches the process's recording on or off.
func (f *File) Record(enable bool) {
	v := uint32(0)
	if enable {
		v = 1
	}
	(*atomic.Uint32)(unsafe.Pointer(&f.mem[0])).Store(v)
}

// Records returns what the process recorded, oldest first, and how many
// older records the ring lost. Read it with recording off.
func (f *File) Records() ([]Record, uint64) {
	n := (*atomic.Uint64)(unsafe.Pointer(&f.mem[8])).Load()
	first := uint64(0)
	if n > Records {
		first = n - Records
	}
	out := make([]Record, 0, n-first)
	for i := first; i < n; i++ {
		off := headerSize + (i%Records)*recordSize
		out = append(out, Record{At: int64(binary.LittleEndian.Uint64(f.mem[off:])), Point: Point(binary.LittleEndian.Uint64(f.mem[off+8:]))})
	}
	return out, first
}

// Close unmaps the file.
func (f *File) Close() error {
	if f.mem == nil {
		return errors.New("hoptrace: closed")
	}
	err := unix.Munmap(f.mem)
	f.mem = nil
	return err
}
