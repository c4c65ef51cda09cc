package main

import "syscall"

// procAttr makes a helper die with the bench (PR_SET_PDEATHSIG) in a
// process group of its own (a terminal's Ctrl-C reaches the bench only,
// which then cleans up).
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}
