package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Binaries are the programs a Node runs.
type Binaries struct {
	// Dir holds them all; it is the CNI plugin path given to libcni.
	Dir string
	// CNI is the shm-cni plugin, named "shm-cni" in Dir.
	CNI string
	// Agent is shm-agent.
	Agent string
	// Sandbox is the sandbox workload program, built against gVisor with
	// the runsc patch series applied (patchedGVisor): its netstack is the
	// one runsc pods get from shm-cni's runsc.
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
	if err := goBuild(ctx, goBin, root, outDir, false, nil, "./cmd/shm-cni"); err != nil {
		return Binaries{}, err
	}
	if err := goBuild(ctx, goBin, root, outDir, opts.Race, nil, "./cmd/shm-agent"); err != nil {
		return Binaries{}, err
	}
	// The sandbox's netstack is gVisor's as the runsc shm-cni builds
	// carries it: with the patch series applied (its TCP fixes among it).
	work, err := patchedGVisor(ctx, goBin, root, outDir)
	if err != nil {
		return Binaries{}, err
	}
	if err := goBuild(ctx, goBin, root, outDir, opts.Race, []string{"GOWORK=" + work}, "./test/e2e/sandbox"); err != nil {
		return Binaries{}, err
	}
	if err := goBuild(ctx, goBin, root, outDir, false, nil, "./test/e2e/hostile"); err != nil {
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
// or with the race detector, which needs cgo; env is added to the build's
// environment.
func goBuild(ctx context.Context, goBin, root, outDir string, race bool, env []string, pkgs ...string) error {
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
	cmd.Env = append(append(os.Environ(), "CGO_ENABLED="+cgo), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out.Bytes())
	}
	return nil
}

// gvisorModule is the module the runsc patch series (hack/runsc) patches.
const gvisorModule = "gvisor.dev/gvisor"

// patchedGVisor returns a Go workspace file, in outDir, that builds the
// module at root against the pinned gVisor with the runsc patch series
// (hack/runsc/NNNN-*.patch) applied in order, as hack/cri-deps.sh builds
// runsc. The patched source is made once per gVisor version and series, in
// the user's cache directory (shm-cni/gvisor-HASH), from a copy of the
// module source with git apply; builds that race to make it agree, the
// first rename wins. Copies of other series are pruned (pruneGVisorCopies).
func patchedGVisor(ctx context.Context, goBin, root, outDir string) (string, error) {
	cmd := exec.CommandContext(ctx, goBin, "list", "-m", "-f", "{{.Dir}} {{.Version}}", gvisorModule)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s: %w", gvisorModule, err)
	}
	src, version, ok := strings.Cut(strings.TrimSpace(string(out)), " ")
	if !ok || src == "" {
		return "", fmt.Errorf("go list -m %s: no source directory (%q): run go mod download", gvisorModule, out)
	}
	series, err := filepath.Glob(filepath.Join(root, "hack", "runsc", "[0-9][0-9][0-9][0-9]-*.patch"))
	if err != nil || len(series) == 0 {
		return "", fmt.Errorf("the runsc patch series in %s: none found (%v)", filepath.Join(root, "hack", "runsc"), err)
	}
	slices.Sort(series)
	h := sha256.New()
	io.WriteString(h, version)
	for _, p := range series {
		b, err := os.ReadFile(p)
		if err != nil {
			return "", fmt.Errorf("the runsc patch series: %w", err)
		}
		h.Write(b)
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "shm-cni", fmt.Sprintf("gvisor-%x", h.Sum(nil)[:8]))
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		if err := applySeries(ctx, src, dir, series); err != nil {
			return "", fmt.Errorf("apply the runsc patch series to %s@%s: %w", gvisorModule, version, err)
		}
	}
	// Mark it used, and let go of copies of other series (about 70 MB
	// each) that no build has used for a while. Both are best effort: a
	// cache that cannot be tidied still builds.
	now := time.Now()
	if err := os.Chtimes(dir, now, now); err == nil {
		_ = pruneGVisorCopies(filepath.Dir(dir), keepGVisorCopies, now.Add(-gvisorCopyIdle))
	}
	work := filepath.Join(outDir, "go.work")
	if err := os.Remove(work); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	for _, args := range [][]string{
		{"work", "init", root},
		{"work", "edit", "-replace", gvisorModule + "=" + dir},
	} {
		cmd := exec.CommandContext(ctx, goBin, args...)
		cmd.Dir = outDir
		cmd.Env = append(os.Environ(), "GOWORK="+work)
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
		}
	}
	return work, nil
}

const (
	// keepGVisorCopies is how many patched copies of gVisor (the most
	// recently used) stay in the cache whatever their age: a few series
	// built in turn (worktrees, a bisection) keep theirs.
	keepGVisorCopies = 3
	// gvisorCopyIdle is how long a copy beyond those stays unused before
	// it is removed (and a copy left half made by a build that died).
	gvisorCopyIdle = 24 * time.Hour
)

// pruneGVisorCopies removes, from the cache directory dir, the patched
// gVisor copies (gvisor-HASH) beyond the keep most recently used, and
// the half-made ones (gvisor-HASH.tmp-*), that were last used (modified)
// before idle.
func pruneGVisorCopies(dir string, keep int, idle time.Time) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	type copyDir struct {
		path string
		used time.Time
		tmp  bool
	}
	var copies []copyDir
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "gvisor-") {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		copies = append(copies, copyDir{filepath.Join(dir, e.Name()), info.ModTime(), strings.Contains(e.Name(), ".tmp-")})
	}
	slices.SortFunc(copies, func(a, b copyDir) int { return b.used.Compare(a.used) })
	kept := 0
	for _, c := range copies {
		if !c.tmp && kept < keep {
			kept++
			continue
		}
		if c.used.Before(idle) {
			if err := os.RemoveAll(c.path); err != nil {
				return fmt.Errorf("remove the unused patched gVisor %s: %w", c.path, err)
			}
		}
	}
	return nil
}

// applySeries copies the module source src to a fresh directory beside
// dir, applies the series there and renames it to dir.
func applySeries(ctx context.Context, src, dir string, series []string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), filepath.Base(dir)+".tmp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp) // nothing left once renamed
	// CopyFS makes the files writable (the module cache's are not).
	if err := os.CopyFS(tmp, os.DirFS(src)); err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	// Its own repository, so that git apply resolves the patches' paths
	// against the copy wherever it is.
	if out, err := exec.CommandContext(ctx, "git", "-C", tmp, "init", "-q").CombinedOutput(); err != nil {
		return fmt.Errorf("git init: %w\n%s", err, out)
	}
	for _, p := range series {
		if out, err := exec.CommandContext(ctx, "git", "-C", tmp, "apply", p).CombinedOutput(); err != nil {
			return fmt.Errorf("%s does not apply: %w\n%s", filepath.Base(p), err, out)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		if _, serr := os.Stat(filepath.Join(dir, "go.mod")); serr == nil {
			return nil // another build made it first
		}
		return err
	}
	return nil
}
