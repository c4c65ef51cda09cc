// Package pattern is the test traffic's payload: a deterministic byte
// pattern that a receiver checks byte by byte (the tests), or zeros that it
// only counts (the benchmarks, which measure the path, not the tool). The
// node harness and the sandbox program both use it, so the two ends always
// agree.
package pattern

import (
	"errors"
	"fmt"
	"io"
	"math"
	"time"
)

// Byte is the pattern's byte at offset off: byte((off * 0x9E3779B1) >> 24).
func Byte(off int64) byte { return byte((uint64(off) * 0x9E3779B1) >> 24) }

// Send writes the first n bytes of the pattern to w.
func Send(w io.Writer, n int64) error {
	_, err := send(w, n, time.Time{}, false)
	return err
}

// SendZeros writes n zero bytes to w: what a benchmark sends, without the
// cost of making the pattern.
func SendZeros(w io.Writer, n int64) error {
	_, err := send(w, n, time.Time{}, true)
	return err
}

// SendFor writes the pattern (zeros: zero bytes) to w until d has passed,
// and returns how many bytes it wrote: a benchmark's timed transfer, as
// long as an iperf3 measurement beside it, so that a stream's start (its
// window's growth, a fresh process's warm-up) weighs the same on both.
func SendFor(w io.Writer, d time.Duration, zeros bool) (int64, error) {
	return send(w, math.MaxInt64, time.Now().Add(d), zeros)
}

// send writes n bytes of the pattern or zeros to w in 64 KiB writes,
// stopping early at until (when not zero), and returns how many it wrote.
func send(w io.Writer, n int64, until time.Time, zeros bool) (int64, error) {
	buf := make([]byte, 64<<10)
	off := int64(0)
	for off < n && (until.IsZero() || time.Now().Before(until)) {
		c := min(int64(len(buf)), n-off)
		if !zeros {
			for i := range c {
				buf[i] = Byte(off + i)
			}
		}
		if _, err := w.Write(buf[:c]); err != nil {
			return off, fmt.Errorf("write at %d: %w", off, err)
		}
		off += c
	}
	return off, nil
}

// Count reads r to its end and counts the bytes: what a benchmark's sink
// does, without the cost of checking them. It reads 128 KiB at a time (a
// sender's write, iperf3's read): io.Copy to io.Discard reads 8 KiB at a
// time, and a read into a runsc pod is a system call the Sentry serves.
func Count(r io.Reader) (int64, error) {
	buf := make([]byte, 128<<10)
	var n int64
	for {
		c, err := r.Read(buf)
		n += int64(c)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// Check reads r to its end and checks every byte against the
// pattern; it returns how many bytes were right.
func Check(r io.Reader) (int64, error) {
	buf := make([]byte, 64<<10)
	var off int64
	for {
		c, err := r.Read(buf)
		for i := range c {
			if buf[i] != Byte(off) {
				return off, fmt.Errorf("byte %d: got %#x, want %#x", off, buf[i], Byte(off))
			}
			off++
		}
		if errors.Is(err, io.EOF) {
			return off, nil
		}
		if err != nil {
			return off, fmt.Errorf("read at %d: %w", off, err)
		}
	}
}
