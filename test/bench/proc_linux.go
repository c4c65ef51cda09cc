package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// procAttr makes a helper die with the bench (PR_SET_PDEATHSIG) in a
// process group of its own (a terminal's Ctrl-C reaches the bench only,
// which then cleans up).
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}

// userHZ is the unit of /proc/stat's times: USER_HZ, 100 on every Linux
// architecture the project runs on (times(2)).
const userHZ = 100

// busyCPUSeconds returns the machine's busy CPU time so far: user, nice,
// system, irq and softirq of every CPU (/proc/stat), so that the difference
// over a measurement is what everything running (the agent, the sandboxes,
// the kernel's network stack, tools) spent. Idle, iowait and steal are not
// counted.
func busyCPUSeconds() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal ...
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy uint64
	for _, i := range []int{1, 2, 3, 6, 7} {
		v, err := strconv.ParseUint(f[i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		busy += v
	}
	return float64(busy) / userHZ, nil
}
