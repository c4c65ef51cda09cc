package endpoint

import "syscall"

// osYield lets the kernel run another thread waiting for this CPU.
func osYield() { _, _, _ = syscall.RawSyscall(syscall.SYS_SCHED_YIELD, 0, 0, 0) }

// Yield lets the kernel run another thread waiting for this CPU (a writer
// waiting for its peer to free room gives the peer the CPU).
func Yield() { osYield() }
