// Package runsc holds the patch series the project carries against the
// pinned gVisor (gvisor.dev/gvisor in go.mod), which hack/cri-deps.sh
// applies before it builds runsc and containerd-shim-runsc-v1. Its test
// checks that the series still applies to that version.
package runsc

import (
	"bytes"
	"fmt"
	"go/format"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// gvisorModule is the module the series patches.
const gvisorModule = "gvisor.dev/gvisor"

// seriesName is a patch's file name: a four-digit number, a dash, a slug.
var seriesName = regexp.MustCompile(`^(\d{4})-[A-Za-z0-9._-]+\.patch$`)

// TestSeriesApplies applies the whole series, in order, to a copy of the
// files it touches in the pinned gVisor module source, as
// hack/cri-deps.sh does to the whole tree, and fails naming the first
// patch that does not apply. The Go files the series leaves must be
// gofmt-clean. A gVisor bump that breaks the series fails here, not an
// hour into a runtime tier's build.
func TestSeriesApplies(t *testing.T) {
	series := readSeries(t)
	src, version := moduleDir(t)
	dir := t.TempDir()
	git(t, dir, "init", "-q")

	var touched []string
	for _, p := range series {
		for _, f := range p.files {
			if !slices.Contains(touched, f) {
				touched = append(touched, f)
			}
		}
	}
	for _, f := range touched {
		b, err := os.ReadFile(filepath.Join(src, f))
		if os.IsNotExist(err) {
			continue // a file the series creates
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(f)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	for _, p := range series {
		out, err := exec.Command("git", "-C", dir, "apply", "--verbose", p.path).CombinedOutput()
		if err != nil {
			t.Fatalf("patch %s does not apply to %s@%s: %v\n%s", p.name, gvisorModule, version, err, out)
		}
	}
	for _, f := range touched {
		if !strings.HasSuffix(f, ".go") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, f))
		if os.IsNotExist(err) {
			continue // a file the series deletes
		}
		if err != nil {
			t.Fatal(err)
		}
		formatted, err := format.Source(b)
		if err != nil {
			t.Errorf("%s after the series: %v", f, err)
		} else if !bytes.Equal(formatted, b) {
			t.Errorf("%s after the series is not gofmt-clean", f)
		}
	}
}

// TestSeriesBuildsAndPasses applies the series to a whole copy of the
// pinned gVisor, builds runsc and the shim, and runs the tests the series
// adds. It takes a minute or more (a cold build much longer), so it runs
// only with SHM_CNI_RUNSC_TESTS=1: when changing the series or bumping
// gVisor.
func TestSeriesBuildsAndPasses(t *testing.T) {
	if os.Getenv("SHM_CNI_RUNSC_TESTS") != "1" {
		t.Skip("set SHM_CNI_RUNSC_TESTS=1 to build the patched runsc and run the series' tests")
	}
	series := readSeries(t)
	src, version := moduleDir(t)
	dir := filepath.Join(t.TempDir(), "gvisor")
	if out, err := exec.Command("cp", "-r", src, dir).CombinedOutput(); err != nil {
		t.Fatalf("copy %s: %v\n%s", src, err, out)
	}
	if out, err := exec.Command("chmod", "-R", "u+w", dir).CombinedOutput(); err != nil {
		t.Fatalf("chmod: %v\n%s", err, out)
	}
	git(t, dir, "init", "-q")
	for _, p := range series {
		if out, err := exec.Command("git", "-C", dir, "apply", p.path).CombinedOutput(); err != nil {
			t.Fatalf("patch %s does not apply to %s@%s: %v\n%s", p.name, gvisorModule, version, err, out)
		}
	}
	for _, args := range [][]string{
		{"build", "-o", os.DevNull, "./runsc"},
		{"build", "-o", os.DevNull, "./shim"},
		{"test", "-count=1", "-run", "SharedMem", "./runsc/boot/", "./runsc/sandbox/"},
		{"test", "-count=1", "-run", "TailLossProbe|SpuriousRecoveryUndone|TLPEpisode|LostFlightRetransmittedAfterTimeout|DSACK", "./pkg/tcpip/transport/tcp/"},
		{"test", "-count=1", "-run", "TXHostGSO|RXPartialChecksums", "./pkg/tcpip/link/sharedmem/"},
		{"test", "-count=1", "-run", "Uncleared", "./pkg/buffer/"},
		{"test", "-count=1", "-run", "AssertNoWakep", "./pkg/sleep/"},
	} {
		cmd := exec.Command("go", args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("go %s in the patched %s@%s: %v\n%s", strings.Join(args, " "), gvisorModule, version, err, out)
		}
		t.Logf("go %s:\n%s", strings.Join(args, " "), out)
	}
}

// TestSeriesShape checks that the series is numbered 0001, 0002, ... with
// no gap, and that every patch is a commit (git format-patch): a From
// line, a Subject and a message body before its diff.
func TestSeriesShape(t *testing.T) {
	for i, p := range readSeries(t) {
		if want := fmt.Sprintf("%04d-", i+1); !strings.HasPrefix(p.name, want) {
			t.Errorf("patch %s: want number %s (no gaps, from 0001)", p.name, strings.TrimSuffix(want, "-"))
		}
		head, _, ok := strings.Cut(p.text, "\ndiff --git ")
		if !ok {
			t.Errorf("patch %s: no diff", p.name)
			continue
		}
		if !strings.HasPrefix(head, "From ") || !strings.Contains(head, "\nSubject: ") {
			t.Errorf("patch %s: no From line and Subject header: not a git format-patch commit", p.name)
		}
		_, body, _ := strings.Cut(head, "\n\n")
		body, _, _ = strings.Cut(body, "\n---\n")
		if len(strings.Fields(body)) < 10 {
			t.Errorf("patch %s: its commit message has no body saying why", p.name)
		}
		if len(p.files) == 0 {
			t.Errorf("patch %s: touches no file", p.name)
		}
	}
}

// patch is one patch of the series.
type patch struct {
	name, path, text string
	// files are the paths the patch touches, relative to the module root.
	files []string
}

// readSeries returns the series in order; there must be one.
func readSeries(t *testing.T) []patch {
	t.Helper()
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	var series []patch
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".patch") {
			continue
		}
		if !seriesName.MatchString(e.Name()) {
			t.Errorf("%s: not a series name (NNNN-slug.patch)", e.Name())
			continue
		}
		path, err := filepath.Abs(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		p := patch{name: e.Name(), path: path, text: string(b)}
		for _, line := range strings.Split(p.text, "\n") {
			if rest, ok := strings.CutPrefix(line, "diff --git a/"); ok {
				a, _, _ := strings.Cut(rest, " b/")
				p.files = append(p.files, a)
			}
		}
		series = append(series, p)
	}
	if len(series) == 0 {
		t.Fatal("no patch in the series")
	}
	return series // os.ReadDir sorts by name
}

// moduleDir returns the pinned gVisor's source directory in the module
// cache, downloading it if needed, and its version.
func moduleDir(t *testing.T) (dir, version string) {
	t.Helper()
	list := func() (string, string) {
		out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}} {{.Version}}", gvisorModule).Output()
		if err != nil {
			t.Fatalf("go list -m %s: %v", gvisorModule, err)
		}
		dir, version, _ := strings.Cut(strings.TrimSpace(string(out)), " ")
		return dir, version
	}
	dir, version = list()
	if dir == "" {
		if out, err := exec.Command("go", "mod", "download", gvisorModule).CombinedOutput(); err != nil {
			t.Fatalf("go mod download %s: %v\n%s", gvisorModule, err, out)
		}
		dir, version = list()
	}
	if dir == "" {
		t.Fatalf("%s@%s is not in the module cache after go mod download", gvisorModule, version)
	}
	return dir, version
}

// git runs git in dir.
func git(t *testing.T, dir string, args ...string) {
	t.Helper()
	if out, err := exec.Command("git", append([]string{"-C", dir}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
