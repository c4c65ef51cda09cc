package untrusted

import (
	"strings"
	"testing"
)

// TestQuote: short values are quoted whole, long ones cut to 64 bytes.
func TestQuote(t *testing.T) {
	long := strings.Repeat("a", 100)
	for _, tc := range []struct{ in, want string }{
		{"eth0", `"eth0"`},
		{"a\nb", `"a\nb"`},
		{long[:64], `"` + long[:64] + `"`},
		{long, `"` + long[:64] + `"...`},
	} {
		if got := Quote(tc.in); got != tc.want {
			t.Errorf("Quote(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}
