package node

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// Binaries are the programs a Node runs.
type Binaries struct {
	// Dir holds them all; it is the CNI plugin path given to libcni.
	Dir string
	// CNI is the shm-cni plugin, named "shm-cni" in Dir.
	CNI string
	// Agent is shm-agent.
	Agent string
	// Sandbox is the sandbox workload program.
	Sandbox string
	// Hostile is the hostile sandbox program (test/e2e/hostile).
	Hostile string
}

// BuildOptions tune Build.
type BuildOptions struct {
	// Race builds the agent and the sandbox with the race detector, so
	// that a data race under real traffic kills them (and fails the test
	// that sees them die). They are several times slower then.
	Race bool
}

// Build compiles shm-cni, shm-agent, the sandbox and hostile programs of the module
// the current directory is in into outDir, which must exist.
func Build(ctx context.Context, outDir string, opts BuildOptions) (Binaries, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		// go test and go run put GOROOT/bin first in PATH; a built demo
		// may not have it.
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	root, err := moduleRoot(ctx, goBin)
	if err != nil {
		return Binaries{}, err
	}
	outDir, err = filepath.Abs(outDir)
	if err != nil {
		return Binaries{}, fmt.Errorf("build: %w", err)
	}
	b := Binaries{
		Dir:     outDir,
		CNI:     filepath.Join(outDir, "shm-cni"),
		Agent:   filepath.Join(outDir, "shm-agent"),
		Sandbox: filepath.Join(outDir, "sandbox"),
		Hostile: filepath.Join(outDir, "hostile"),
	}
	// The CNI binary is never raced: it runs hundreds of times per test
	// run and is short lived.
	if err := goBuild(ctx, goBin, root, outDir, false, "./cmd/shm-cni"); err != nil {
		return Binaries{}, err
	}
	if err := goBuild(ctx, goBin, root, outDir, opts.Race, "./cmd/shm-agent", "./test/e2e/sandbox"); err != nil {
		return Binaries{}, err
	}
	if err := goBuild(ctx, goBin, root, outDir, false, "./test/e2e/hostile"); err != nil {
		return Binaries{}, err
	}
	return b, nil
}

// moduleRoot returns the directory of the current module's go.mod.
func moduleRoot(ctx context.Context, goBin string) (string, error) {
	out, err := exec.CommandContext(ctx, goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("go env GOMOD: not inside the shm-cni module (run from its directory)")
	}
	return filepath.Dir(gomod), nil
}

// ReleaseFlags are go build's flags for the binaries as shipped: the
// image's (hack/image builds them so, with CGO_ENABLED=0), static.
var ReleaseFlags = []string{"-trimpath", "-buildvcs=false", "-ldflags=-s"}

// goBuild builds pkgs into outDir as shipped (ReleaseFlags, without cgo),
// or with the race detector, which needs cgo.
func goBuild(ctx context.Context, goBin, root, outDir string, race bool, pkgs ...string) error {
	args := []string{"build", "-o", outDir + string(filepath.Separator)}
	cgo := "0"
	if race {
		args = append(args, "-race")
		cgo = "1"
	} else {
		args = append(args, ReleaseFlags...)
	}
	args = append(args, pkgs...)
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED="+cgo)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out.Bytes())
	}
	return nil
}
