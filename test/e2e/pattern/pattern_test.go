package pattern

import (
	"bytes"
	"testing"
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
