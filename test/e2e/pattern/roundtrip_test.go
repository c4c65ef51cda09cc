package pattern

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// echoServer serves one connection on loopback with serve and returns the
// client's end.
func echoServer(t *testing.T, serve func(net.Conn)) net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		serve(c)
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRoundTrips(t *testing.T) {
	c := echoServer(t, func(c net.Conn) { io.Copy(c, c) })
	ds, err := RoundTrips(context.Background(), c, 50)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 50 {
		t.Fatalf("%d round trips, want 50", len(ds))
	}
	for i, d := range ds {
		if d <= 0 {
			t.Fatalf("round trip %d took %v", i, d)
		}
	}
}

// An echo that answers with other bytes than the request's is an error.
func TestRoundTripsMismatch(t *testing.T) {
	c := echoServer(t, func(c net.Conn) {
		b := make([]byte, RoundTripSize)
		for k := 0; ; k++ {
			if _, err := io.ReadFull(c, b); err != nil {
				return
			}
			if k == 300 {
				b[RoundTripSize-1]++ // the high byte of the request's number
			}
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	})
	_, err := RoundTrips(context.Background(), c, 1000)
	if err == nil || !strings.Contains(err.Error(), "round trip 300: the echo does not match") {
		t.Fatalf("err = %v, want round trip 300's mismatch", err)
	}
}

// A peer that stops answering is cut off when ctx ends.
func TestRoundTripsContext(t *testing.T) {
	c := echoServer(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := RoundTrips(ctx, c, 10); err == nil {
		t.Fatal("round trips to a silent peer succeeded")
	}
}

func TestRoundTripReport(t *testing.T) {
	ds := []time.Duration{1, 70123, 2 * time.Second}
	l := FormatRoundTrips(ds)
	if l != "rtt: 1,70123,2000000000" {
		t.Fatalf("line %q", l)
	}
	got, err := ParseRoundTrips(l)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(ds) || got[0] != ds[0] || got[1] != ds[1] || got[2] != ds[2] {
		t.Fatalf("parsed %v, want %v", got, ds)
	}
	for _, bad := range []string{"", "rtt: ", "sent 5", "rtt: 1,,2", "rtt: 1,x", "rtt: 0", "rtt: -5"} {
		if _, err := ParseRoundTrips(bad); err == nil {
			t.Errorf("ParseRoundTrips(%q) succeeded", bad)
		}
	}
}
