package main

import (
	"slices"
	"testing"
)

func TestParseEnv(t *testing.T) {
	got, err := parseEnv(" GOMAXPROCS=1  GODEBUG=a=1,b=2 EMPTY= ")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"GOMAXPROCS=1", "GODEBUG=a=1,b=2", "EMPTY="}; !slices.Equal(got, want) {
		t.Errorf("parseEnv = %q, want %q", got, want)
	}
	if got, err := parseEnv(""); err != nil || len(got) != 0 {
		t.Errorf("parseEnv(\"\") = %q, %v; want nothing", got, err)
	}
	for _, bad := range []string{"GOMAXPROCS", "=1", "A=1 B"} {
		if _, err := parseEnv(bad); err == nil {
			t.Errorf("parseEnv(%q): no error", bad)
		}
	}
}
