package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cpuCap is a cgroup whose processes share a CPU quota, like a pod's CPU
// limit: on a machine with few cores, a sandbox that may use every core it
// finds takes its neighbours' CPU by itself, whatever the agent does. A
// nil *cpuCap caps nothing.
type cpuCap struct {
	dir string
}

// newCPUCap makes a cgroup (v2, or v1's cpu controller) limited to cores
// CPUs and removes it at the end of t; without either it logs that the
// measurement runs uncapped and returns nil.
func newCPUCap(t *testing.T, name string, cores float64) *cpuCap {
	t.Helper()
	const period = 100000
	quota := int(cores * period)
	var dir, file, value string
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		dir, file, value = filepath.Join("/sys/fs/cgroup", name), "cpu.max", fmt.Sprintf("%d %d", quota, period)
	} else if _, err := os.Stat("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"); err == nil {
		dir, file, value = filepath.Join("/sys/fs/cgroup/cpu", name), "cpu.cfs_quota_us", strconv.Itoa(quota)
	} else {
		t.Logf("no cgroup CPU controller: the hostile sandbox runs without a CPU limit")
		return nil
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		t.Logf("cgroup %s: %v: the hostile sandbox runs without a CPU limit", dir, err)
		return nil
	}
	c := &cpuCap{dir: dir}
	t.Cleanup(c.remove)
	if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0o644); err != nil {
		t.Fatalf("cgroup %s: %v", dir, err)
	}
	t.Logf("hostile sandboxes run in cgroup %s limited to %.1f CPU", name, cores)
	return c
}

// add moves pid (all its threads) into the cgroup.
func (c *cpuCap) add(t *testing.T, pid int) {
	if c == nil {
		return
	}
	if err := os.WriteFile(filepath.Join(c.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil && !strings.Contains(err.Error(), "no such process") {
		t.Errorf("move %d into %s: %v", pid, c.dir, err)
	}
}

// remove removes the cgroup once its processes are gone.
func (c *cpuCap) remove() {
	for range 50 {
		if err := unix.Rmdir(c.dir); err == nil || os.IsNotExist(err) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// procCPU is the CPU time (user and system) pid has used so far.
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command, which is in parentheses: state is field
	// 3, utime 14 and stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticksPerSecond = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / ticksPerSecond
}
