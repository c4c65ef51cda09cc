// Command shm-cni is the shm-cni CNI plugin binary; see package cni.
package main

import (
	"os"

	"github.com/shm-cni/shm-cni/pkg/cni"
)

func main() { os.Exit(cni.Main()) }
