package node

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// parseSinkTests are sandbox sink reports, as the sandbox program prints
// them, and what ParseSinkLine makes of them.
var parseSinkTests = []struct {
	line     string
	n        int64
	from     netip.Addr
	verified bool
	wantErr  bool
}{
	{"sink: 1048576 bytes from 10.244.0.2:43210 in 12ms (699.1 Mbit/s) verified", 1 << 20, netip.MustParseAddr("10.244.0.2"), true, false},
	{"sink: 5 bytes from [fd00:10:244::3]:7000 in 1.5s (0.0 Mbit/s) verified", 5, netip.MustParseAddr("fd00:10:244::3"), true, false},
	{"sink: 7 bytes from 10.244.0.2:9 in 1ms (0.1 Mbit/s) counted", 7, netip.MustParseAddr("10.244.0.2"), false, false},
	{"sink: 100 bytes from 10.244.0.2:1 in 1ms (0.8 Mbit/s) BAD: byte 99: got 0x1, want 0x2", 100, netip.MustParseAddr("10.244.0.2"), false, true},
	{"sink: x bytes from 10.244.0.2:1 in 1ms (0.8 Mbit/s) verified", 0, netip.Addr{}, false, true},
	{"sink: 1 bytes from nowhere in 1ms (0.8 Mbit/s) verified", 0, netip.Addr{}, false, true},
	{"ready", 0, netip.Addr{}, false, true},
	{"", 0, netip.Addr{}, false, true},
}

// TestParseSinkLine checks the sink report parser on good and bad lines.
func TestParseSinkLine(t *testing.T) {
	for _, tt := range parseSinkTests {
		n, from, verified, err := ParseSinkLine(tt.line)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseSinkLine(%q): err %v, want error %v", tt.line, err, tt.wantErr)
			continue
		}
		if n != tt.n || from != tt.from || verified != tt.verified {
			t.Errorf("ParseSinkLine(%q) = %d, %v, %t; want %d, %v, %t", tt.line, n, from, verified, tt.n, tt.from, tt.verified)
		}
	}
}

// parseSentTests are sandbox sender reports and what ParseSentLine makes of
// them.
var parseSentTests = []struct {
	line    string
	n       int64
	d       time.Duration
	wantErr bool
}{
	{"sent 104857600 bytes to 10.244.0.3:7000 in 1.02s (822.4 Mbit/s)", 100 << 20, 1020 * time.Millisecond, false},
	{"sent 1 bytes to [fd00:10:244::1]:80 in 850ms (0.0 Mbit/s)", 1, 850 * time.Millisecond, false},
	{"sent 1 bytes to 10.244.0.3:7000 in soon (0.0 Mbit/s)", 0, 0, true},
	{"connected 10.244.0.2:1 -> 10.244.0.3:2", 0, 0, true},
}

// TestParseSentLine checks the sender report parser on good and bad lines.
func TestParseSentLine(t *testing.T) {
	for _, tt := range parseSentTests {
		n, d, err := ParseSentLine(tt.line)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseSentLine(%q): err %v, want error %v", tt.line, err, tt.wantErr)
			continue
		}
		if n != tt.n || d != tt.d {
			t.Errorf("ParseSentLine(%q) = %d, %v; want %d, %v", tt.line, n, d, tt.n, tt.d)
		}
	}
}

// TestParseTCPLine checks the sender's TCP report parser on good and bad
// lines.
func TestParseTCPLine(t *testing.T) {
	for _, tt := range []struct {
		line    string
		want    SenderTCP
		wantErr bool
	}{
		{"tcp: segments 8204, acks 2541, retransmits 3, recoveries 2, spurious 1, timeouts 0, link drops 4",
			SenderTCP{Segments: 8204, Acks: 2541, Retransmits: 3, Recoveries: 2, Spurious: 1, LinkDrops: 4}, false},
		{"tcp: segments 1, acks 1, retransmits 0, recoveries 0, spurious 0, timeouts 7, link drops 0", SenderTCP{Segments: 1, Acks: 1, Timeouts: 7}, false},
		{"tcp: segments 1, acks 1, retransmits 0, recoveries 0, spurious 0, timeouts 0", SenderTCP{}, true},
		{"tcp: segments -1, acks 1, retransmits 0, recoveries 0, spurious 0, timeouts 0, link drops 0", SenderTCP{}, true},
		{"tcp: segments 99999999999999999999, acks 1, retransmits 0, recoveries 0, spurious 0, timeouts 0, link drops 0", SenderTCP{}, true},
		{"sent 1 bytes to 10.244.0.3:7000 in 1s (0.0 Mbit/s)", SenderTCP{}, true},
	} {
		got, err := ParseTCPLine(tt.line)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseTCPLine(%q): err %v, want error %v", tt.line, err, tt.wantErr)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseTCPLine(%q) = %+v, want %+v", tt.line, got, tt.want)
		}
	}
}

// FuzzParseSinkLine feeds the sink report parser arbitrary lines (a
// sandbox's stdout): it never panics, and a line it accepts names a valid
// address.
func FuzzParseSinkLine(f *testing.F) {
	for _, tt := range parseSinkTests {
		f.Add(tt.line)
	}
	f.Fuzz(func(t *testing.T, line string) {
		n, from, _, err := ParseSinkLine(line)
		if err == nil && (!from.IsValid() || n < 0) {
			t.Errorf("ParseSinkLine(%q) = %d, %v without error", line, n, from)
		}
	})
}

// FuzzParseSentLine feeds the sender report parser arbitrary lines.
func FuzzParseSentLine(f *testing.F) {
	for _, tt := range parseSentTests {
		f.Add(tt.line)
	}
	f.Fuzz(func(t *testing.T, line string) {
		n, _, err := ParseSentLine(line)
		if err == nil && n < 0 {
			t.Errorf("ParseSentLine(%q) = %d without error", line, n)
		}
	})
}

// TestAmountSenderArgs checks the sandbox program's flags for an amount:
// a duration when set, else bytes.
func TestAmountSenderArgs(t *testing.T) {
	for _, c := range []struct {
		a    Amount
		want string
	}{
		{Amount{Bytes: 1 << 20}, "--bytes 1048576"},
		{Amount{Duration: 3 * time.Second}, "--duration 3s"},
		{Amount{Bytes: 5, Duration: time.Second}, "--duration 1s"},
	} {
		if got := strings.Join(c.a.SenderArgs(), " "); got != c.want {
			t.Errorf("%+v: %q, want %q", c.a, got, c.want)
		}
	}
}
