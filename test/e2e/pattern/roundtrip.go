package pattern

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/shm-cni/shm-cni/internal/hoptrace"
)

// RoundTripSize is the size of a round trip's request and of its echo.
const RoundTripSize = 64

// RoundTripWarmup is how many round trips RoundTrips makes first without
// counting them.
const RoundTripWarmup = 200

// RoundTrips writes RoundTripSize-byte requests on c and reads their echo,
// count times after RoundTripWarmup uncounted ones, and returns each
// counted round trip's time. Each request differs from the one before; an
// echo that does not match its request is an error. The application's
// write and the read's return are marked for the benchmark's round-trip
// trace (hoptrace; nothing unless traced). The harness's kernel clients
// and the sandbox program's client both use it.
func RoundTrips(ctx context.Context, c net.Conn, count int) ([]time.Duration, error) {
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	req := make([]byte, RoundTripSize)
	resp := make([]byte, RoundTripSize)
	out := make([]time.Duration, 0, count)
	for i := range RoundTripWarmup + count {
		req[0], req[RoundTripSize-1] = byte(i), byte(i>>8)
		start := time.Now()
		hoptrace.Mark(hoptrace.App)
		if _, err := c.Write(req); err != nil {
			return nil, fmt.Errorf("round trip %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, fmt.Errorf("round trip %d: %w", i, err)
		}
		hoptrace.Mark(hoptrace.Read)
		d := time.Since(start)
		if resp[0] != req[0] || resp[RoundTripSize-1] != req[RoundTripSize-1] {
			return nil, fmt.Errorf("round trip %d: the echo does not match the request", i)
		}
		if i >= RoundTripWarmup {
			out = append(out, d)
		}
	}
	return out, nil
}

// RoundTripPrefix starts a round-trip report line (FormatRoundTrips), for
// readers that wait for one.
const RoundTripPrefix = "rtt: "

// FormatRoundTrips is a report line of round-trip times ("rtt: " and the
// times in nanoseconds, comma-separated), as the sandbox program's rtt
// mode prints them.
func FormatRoundTrips(ds []time.Duration) string {
	var b strings.Builder
	b.Grow(len(RoundTripPrefix) + 8*len(ds))
	b.WriteString(RoundTripPrefix)
	for i, d := range ds {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(int64(d), 10))
	}
	return b.String()
}

// ParseRoundTrips parses a line of FormatRoundTrips.
func ParseRoundTrips(l string) ([]time.Duration, error) {
	rest, ok := strings.CutPrefix(l, RoundTripPrefix)
	if !ok {
		return nil, fmt.Errorf("not a round-trip report: %.40q", l)
	}
	if rest == "" {
		return nil, errors.New("round-trip report without round trips")
	}
	fields := strings.Split(rest, ",")
	out := make([]time.Duration, len(fields))
	for i, f := range fields {
		ns, err := strconv.ParseInt(f, 10, 64)
		if err != nil || ns <= 0 {
			return nil, fmt.Errorf("round-trip report: time %d is %q, not a positive number of nanoseconds", i, f)
		}
		out[i] = time.Duration(ns)
	}
	return out, nil
}
