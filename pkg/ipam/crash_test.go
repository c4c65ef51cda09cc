package ipam

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Environment of the crash child (see TestCrashChild).
const (
	crashDirEnv   = "IPAM_CRASH_CHILD_DIR"
	crashRoundEnv = "IPAM_CRASH_CHILD_ROUND"
	// crashLive is how many allocations the child keeps before it releases
	// the oldest, so that addresses are released and reused across rounds.
	crashLive = 30
)

var crashRanges = []string{"10.9.0.0/26", "fd00:9::/120"} // 61 and 254 pod addresses

// TestCrashChild is the child process of TestCrashSafety: it allocates and
// releases in a loop until killed. It prints "allocating <owner>" before and
// "done <owner> <v4> <v6>" after each Allocate, "releasing <owner>" before and
// "released <owner>" after each Release.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		t.Skip("crash child; runs only under TestCrashSafety")
	}
	a, err := Open(dir, prefixes(t, crashRanges...), Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var live []Owner
	for _, al := range a.List() {
		live = append(live, al.Owner)
	}
	round := os.Getenv(crashRoundEnv)
	for i := 0; ; i++ {
		o := Owner{ContainerID: fmt.Sprintf("r%s-%d", round, i), IfName: "eth0"}
		fmt.Printf("allocating %s\n", o)
		got, err := a.Allocate(o)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Printf("done %s %s %s\n", o, got[0], got[1])
		live = append(live, o)
		for len(live) > crashLive {
			fmt.Printf("releasing %s\n", live[0])
			if err := a.Release(live[0]); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			fmt.Printf("released %s\n", live[0])
			live = live[1:]
		}
	}
}

// TestCrashSafety re-executes the test binary as TestCrashChild, SIGKILLs it
// at pseudo-random points (fixed seed) and checks after every kill that the
// state opens, holds no duplicate or reserved address, and contains every
// allocation the child reported done and none it reported released.
func TestCrashSafety(t *testing.T) {
	if os.Getenv(crashDirEnv) != "" {
		t.Skip("inside the crash child")
	}
	rounds := 40
	if testing.Short() {
		rounds = 8
	}
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(2026, 1))
	// The parent's model of the state: owners whose addresses must be on disk
	// (want), owners whose release started and may or may not be durable
	// (pending), and the owner whose allocation started last (inFlight).
	want := map[string][]string{}
	totalDone := 0
	midWrite := 0 // kills that left a temp file behind
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, fmt.Sprintf("%s=%d", crashRoundEnv, round))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill after a random number of reported operations plus a random
		// delay, so that the kill lands at varying points of a change.
		killAfter := 1 + rng.IntN(40)
		delay := time.Duration(rng.IntN(3000)) * time.Microsecond
		sc := bufio.NewScanner(stdout)
		pending := map[string][]string{}
		inFlight := ""
		done, killed := 0, false
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			switch {
			case len(f) == 2 && f[0] == "allocating":
				inFlight = f[1]
			case len(f) == 4 && f[0] == "done" && f[1] == inFlight:
				want[f[1]] = f[2:]
				inFlight = ""
				totalDone++
			case len(f) == 2 && f[0] == "releasing":
				pending[f[1]] = want[f[1]]
				delete(want, f[1])
			case len(f) == 2 && f[0] == "released":
				delete(pending, f[1])
			}
			if len(f) > 0 && f[0] == "done" {
				done++
			}
			if done == killAfter && !killed {
				time.Sleep(delay)
				if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				killed = true
			}
		}
		err = cmd.Wait()
		if !killed {
			t.Fatalf("round %d: child exited before being killed: %v\n%s", round, err, stderr.Bytes())
		}
		if _, err := os.Stat(filepath.Join(dir, stateTmpFile)); err == nil {
			midWrite++
		}
		want = checkCrashState(t, round, dir, want, pending, inFlight)
	}
	t.Logf("%d rounds (%d killed with a temp file present), %d allocations reported done, %d live at the end",
		rounds, midWrite, totalDone, len(want))
}

// checkCrashState reopens dir and checks it against the parent's model; it
// returns the verified state on disk as the model for the next round.
func checkCrashState(t *testing.T, round int, dir string, want, pending map[string][]string, inFlight string) map[string][]string {
	t.Helper()
	a, err := Open(dir, prefixes(t, crashRanges...), Options{})
	if err != nil {
		t.Fatalf("round %d: reopen after kill: %v", round, err)
	}
	defer a.Close()
	got := map[string][]string{}
	seen := map[netip.Addr]Owner{}
	for _, al := range a.List() {
		if len(al.Addrs) != 2 {
			t.Fatalf("round %d: %s has %v, want one address per family", round, al.Owner, al.Addrs)
		}
		got[al.Owner.String()] = []string{al.Addrs[0].String(), al.Addrs[1].String()}
		for _, ip := range al.Addrs {
			if prev, dup := seen[ip]; dup {
				t.Errorf("round %d: %s allocated to %s and %s", round, ip, prev, al.Owner)
			}
			seen[ip] = al.Owner
			if !a.usable(ip) {
				t.Errorf("round %d: %s has reserved or foreign address %s", round, al.Owner, ip)
			}
		}
	}
	for o, w := range want {
		g, ok := got[o]
		if !ok {
			t.Errorf("round %d: allocation %s %v reported done is missing", round, o, w)
		} else if !slices.Equal(g, w) {
			t.Errorf("round %d: %s has %v, child reported %v", round, o, g, w)
		}
	}
	for o, g := range got {
		if _, ok := want[o]; ok {
			continue
		}
		if w, ok := pending[o]; ok {
			if !slices.Equal(g, w) {
				t.Errorf("round %d: %s (release interrupted) has %v, child reported %v", round, o, g, w)
			}
			continue
		}
		if o != inFlight {
			t.Errorf("round %d: %s %v on disk was never allocated by the child", round, o, g)
		}
	}
	return got
}
