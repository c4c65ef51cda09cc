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
)

// Byte is the pattern's byte at offset off: byte((off * 0x9E3779B1) >> 24).
func Byte(off int64) byte { return byte((uint64(off) * 0x9E3779B1) >> 24) }

// Send writes the first n bytes of the pattern to w.
func Send(w io.Writer, n int64) error {
	buf := make([]byte, 64<<10)
	for off := int64(0); off < n; {
		c := min(int64(len(buf)), n-off)
		for i := range c {
			buf[i] = Byte(off + i)
		}
		if _, err := w.Write(buf[:c]); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		off += c
	}
	return nil
}

// SendZeros writes n zero bytes to w: what a benchmark sends, without the
// cost of making the pattern.
func SendZeros(w io.Writer, n int64) error {
	// 64 KiB writes, as the pattern's.
	_, err := io.CopyBuffer(w, io.LimitReader(zeros{}, n), make([]byte, 64<<10))
	return err
}

// Count reads r to its end and counts the bytes: what a benchmark's sink
// does, without the cost of checking them.
func Count(r io.Reader) (int64, error) { return io.Copy(io.Discard, r) }

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
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
