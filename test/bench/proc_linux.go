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

// childrenUsage returns the CPU seconds and minor page faults of the
// bench's child processes that have ended and been waited for, their own
// waited-for children included (getrusage, RUSAGE_CHILDREN). Over a CNI
// phase that is the plugins' processes and what they ran (an IPAM plugin),
// which libcni execs and waits for, and nothing else: the node's agent and
// tools run on.
func childrenUsage() (cpuSeconds, minorFaults float64, err error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru); err != nil {
		return 0, 0, fmt.Errorf("getrusage: %w", err)
	}
	seconds := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return seconds(ru.Utime) + seconds(ru.Stime), float64(ru.Minflt), nil
}
