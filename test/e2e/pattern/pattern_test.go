package pattern

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"
)

// TestPattern checks that Check accepts what Send writes and
// finds a flipped byte.
func TestPattern(t *testing.T) {
	const size = 200<<10 + 3
	var b bytes.Buffer
	if err := Send(&b, size); err != nil {
		t.Fatal(err)
	}
	if n, err := Check(bytes.NewReader(b.Bytes())); err != nil || n != size {
		t.Errorf("Check = %d, %v; want %d, nil", n, err, int64(size))
	}
	b.Bytes()[777] ^= 1
	if n, err := Check(&b); err == nil || n != 777 {
		t.Errorf("Check of a corrupted stream = %d, %v; want 777 and an error", n, err)
	}
}

// TestSendFor checks that SendFor stops once its time has passed, says how
// much it wrote, and writes the pattern (or zeros) from its start.
func TestSendFor(t *testing.T) {
	for _, zeros := range []bool{false, true} {
		var b bytes.Buffer
		n, err := SendFor(&b, 20*time.Millisecond, zeros)
		if err != nil || n == 0 || n != int64(b.Len()) {
			t.Fatalf("SendFor(zeros %t) = %d, %v with %d bytes written; want them equal and non-zero", zeros, n, err, b.Len())
		}
		if zeros {
			if i := bytes.IndexFunc(b.Bytes(), func(r rune) bool { return r != 0 }); i >= 0 {
				t.Errorf("SendFor(zeros) wrote a non-zero byte at %d", i)
			}
		} else if got, err := Check(&b); err != nil || got != n {
			t.Errorf("Check of SendFor's pattern = %d, %v; want %d, nil", got, err, n)
		}
	}
}

// errAfter fails every write after its first n bytes.
type errAfter struct{ n int }

func (w *errAfter) Write(p []byte) (int, error) {
	if w.n < len(p) {
		return 0, io.ErrClosedPipe
	}
	w.n -= len(p)
	return len(p), nil
}

// TestSendForError checks that SendFor returns a writer's error with the
// bytes written before it.
func TestSendForError(t *testing.T) {
	n, err := SendFor(&errAfter{n: 3 << 16}, time.Minute, true)
	if !errors.Is(err, io.ErrClosedPipe) || n != 3<<16 {
		t.Errorf("SendFor = %d, %v; want %d and the writer's error", n, err, 3<<16)
	}
}
