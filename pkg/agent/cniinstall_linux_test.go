package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// inode returns a file's inode number.
func inode(fi os.FileInfo) uint64 { return fi.Sys().(*syscall.Stat_t).Ino }

// TestInstallFile: a new file is written with its mode, the same content
// again is left alone (same inode: no reload event), new content replaces
// it by rename, and no temporary file stays behind.
func TestInstallFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "net.d") // created by installFile
	dst := filepath.Join(dir, "10-shm-cni.conflist")
	var lastIno uint64
	for _, step := range []struct {
		name        string
		data        string
		perm        os.FileMode
		wantChanged bool
		sameInode   bool
	}{
		{name: "new", data: "one", perm: 0o644, wantChanged: true},
		{name: "same content", data: "one", perm: 0o644, wantChanged: false, sameInode: true},
		{name: "new content", data: "two", perm: 0o644, wantChanged: true},
		{name: "new mode", data: "two", perm: 0o755, wantChanged: true},
	} {
		t.Run(step.name, func(t *testing.T) {
			changed, err := installFile(dst, []byte(step.data), step.perm)
			if err != nil {
				t.Fatal(err)
			}
			if changed != step.wantChanged {
				t.Errorf("changed = %t, want %t", changed, step.wantChanged)
			}
			b, err := os.ReadFile(dst)
			if err != nil || string(b) != step.data {
				t.Errorf("%s holds %q (%v), want %q", dst, b, err, step.data)
			}
			fi, err := os.Stat(dst)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != step.perm {
				t.Errorf("mode %v, want %v", fi.Mode().Perm(), step.perm)
			}
			ino := inode(fi)
			if step.sameInode && ino != lastIno {
				t.Errorf("the file was rewritten (inode %d, was %d)", ino, lastIno)
			}
			if !step.sameInode && ino == lastIno {
				t.Errorf("the file was written in place (inode %d unchanged), not renamed over", ino)
			}
			lastIno = ino
			ents, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			if len(ents) != 1 {
				t.Errorf("directory holds %d files, want only %s", len(ents), filepath.Base(dst))
			}
		})
	}
}

// The real binaries, built once per test binary run by the first test that
// needs them.
var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// builtBinaries returns a directory holding shm-agent and shm-cni built
// from this module; TestMain removes it.
func builtBinaries(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		goTool, err := exec.LookPath("go")
		if err != nil {
			binErr = err
			return
		}
		if binDir, binErr = os.MkdirTemp("", "agent-bin"); binErr != nil {
			return
		}
		out, err := exec.Command(goTool, "build", "-o", binDir+"/", "../../cmd/shm-agent", "../../cmd/shm-cni").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatalf("build the binaries: %v", binErr)
	}
	return binDir
}

// agentProc is a shm-agent process a test started.
type agentProc struct {
	cmd    *exec.Cmd
	log    *bytes.Buffer
	logMu  *sync.Mutex
	exited chan error
}

// lockedBuffer is a bytes.Buffer safe for the child's writer and the test.
type lockedBuffer struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (b lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// logs returns what the agent logged so far.
func (p *agentProc) logs() string {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	return p.log.String()
}

// startAgentProc starts the real agent binary in e's host namespace with
// e's config as flags plus extra.
func startAgentProc(t *testing.T, e *env, extra ...string) *agentProc {
	t.Helper()
	cfg := e.config()
	args := []string{
		"--pod-cidr=" + podCIDR4.String() + "," + podCIDR6.String(),
		"--socket=" + cfg.SocketPath,
		"--state-dir=" + cfg.StateDir,
		"--sandbox-dir=" + cfg.SandboxDir,
		"--metrics-addr=",
		"--log-level=debug",
	}
	p := &agentProc{log: &bytes.Buffer{}, logMu: &sync.Mutex{}, exited: make(chan error, 1)}
	p.cmd = exec.Command(filepath.Join(builtBinaries(t), "shm-agent"), append(args, extra...)...)
	p.cmd.Env = append(os.Environ(), "NODE_NAME=") // no Kubernetes here
	p.cmd.Stdout = lockedBuffer{p.logMu, p.log}
	p.cmd.Stderr = lockedBuffer{p.logMu, p.log}
	// Started from a thread in the host netns: the child is born there.
	testutil.Do(t, e.host, func() error { return p.cmd.Start() })
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill() // the child we started, by its PID
			<-p.exited
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", p.logs())
		}
	})
	return p
}

// stop sends SIGTERM and returns the exit error.
func (p *agentProc) stop(t *testing.T) error {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.exited:
		return err
	case <-time.After(callTimeout):
		t.Fatal("the agent did not exit after SIGTERM")
		return nil
	}
}

// waitFor polls cond until it holds, the agent exits or the hang guard
// fires.
func (p *agentProc) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	guard := time.After(callTimeout)
	for !cond() {
		select {
		case err := <-p.exited:
			p.exited <- err
			t.Fatalf("the agent exited (%v) before %s", err, what)
		case <-guard:
			t.Fatalf("no %s", what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// testConflist is a conflist for the agent of cfg, with a plugin entry
// changed by edit, and then the chained plugins of the given types.
func testConflist(t *testing.T, cfg Config, edit func(map[string]any), chained ...string) []byte {
	t.Helper()
	plugin := map[string]any{"type": "shm-cni", "kind": "tap", "mtu": 1500, "agentSocket": cfg.SocketPath}
	if edit != nil {
		edit(plugin)
	}
	plugins := []any{plugin}
	for _, typ := range chained {
		plugins = append(plugins, map[string]any{"type": typ, "capabilities": map[string]bool{"portMappings": true}})
	}
	b, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": "pods", "plugins": plugins})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCNIInstallRealAgent: the real agent binary, in a fresh host netns,
// installs the CNI binaries (shm-cni, then the chained portmap under its
// own name; 0755, the sources' bytes) and then the conflist chaining
// portmap (0644) once it serves: when the conflist appears both binaries
// are already there and the agent answers STATUS ready; no temporary file
// stays. All stay after SIGTERM; a restarted agent leaves identical files
// alone (same inodes).
func TestCNIInstallRealAgent(t *testing.T) {
	e := newEnv(t)
	bins := builtBinaries(t)
	src := filepath.Join(e.dir, "src")
	binDst, confDst := filepath.Join(e.dir, "opt-cni-bin"), filepath.Join(e.dir, "net.d")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := testConflist(t, e.config(), nil, "portmap")
	if err := os.WriteFile(filepath.Join(src, "10-shm-cni.conflist"), conf, 0o600); err != nil {
		t.Fatal(err)
	}
	// The chained plugin's content does not matter here: the agent copies
	// it, never runs it.
	wantPortmap := []byte("\x7fELF a stand-in for portmap")
	if err := os.WriteFile(filepath.Join(src, "portmap"), wantPortmap, 0o700); err != nil {
		t.Fatal(err)
	}
	flags := []string{
		"--cni-binary-source=" + filepath.Join(bins, "shm-cni"),
		"--cni-chained-binaries=" + filepath.Join(src, "portmap"),
		"--cni-bin-dir=" + binDst,
		"--cni-conf-source=" + filepath.Join(src, "10-shm-cni.conflist"),
		"--cni-conf-dir=" + confDst,
	}
	wantBin, err := os.ReadFile(filepath.Join(bins, "shm-cni"))
	if err != nil {
		t.Fatal(err)
	}
	binPath, confPath := filepath.Join(binDst, "shm-cni"), filepath.Join(confDst, "10-shm-cni.conflist")
	portmapPath := filepath.Join(binDst, "portmap")
	files := []struct {
		path string
		want []byte
		perm os.FileMode
	}{{binPath, wantBin, 0o755}, {portmapPath, wantPortmap, 0o755}, {confPath, conf, 0o644}}

	p := startAgentProc(t, e, flags...)
	p.waitFor(t, "conflist", func() bool { _, err := os.Stat(confPath); return err == nil })
	// The binaries were there first, whole.
	for _, f := range files[:2] {
		if b, err := os.ReadFile(f.path); err != nil || !bytes.Equal(b, f.want) {
			t.Errorf("%s when the conflist appeared: %d bytes, %v; want the source's %d", f.path, len(b), err, len(f.want))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := agentapi.Call(ctx, e.config().SocketPath, &agentapi.Request{Op: agentapi.OpStatus}, nil)
	if err != nil || resp.Status == nil || !resp.Status.Ready {
		t.Errorf("STATUS once the conflist exists: %+v, %v; want ready", resp, err)
	}
	// check returns the files' inodes, in the order of files.
	check := func(t *testing.T) []uint64 {
		t.Helper()
		var inodes []uint64
		for _, f := range files {
			fi, err := os.Stat(f.path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != f.perm {
				t.Errorf("%s: mode %v, want %v", f.path, fi.Mode().Perm(), f.perm)
			}
			if b, _ := os.ReadFile(f.path); !bytes.Equal(b, f.want) {
				t.Errorf("%s: content differs from its source", f.path)
			}
			inodes = append(inodes, inode(fi))
		}
		for dir, want := range map[string]int{binDst: 2, confDst: 1} {
			if ents, _ := os.ReadDir(dir); len(ents) != want {
				t.Errorf("%s holds %d files, want %d (a temporary file left?)", dir, len(ents), want)
			}
		}
		return inodes
	}
	inodes := check(t)
	if err := p.stop(t); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	check(t) // kept on shutdown

	p2 := startAgentProc(t, e, flags...)
	p2.waitFor(t, "second install", func() bool { return strings.Contains(p2.logs(), `"msg":"CNI config installed"`) })
	if got := check(t); !slices.Equal(got, inodes) {
		t.Errorf("identical files rewritten by the restarted agent (inodes %v, were %v)", got, inodes)
	}
	if err := p2.stop(t); err != nil {
		t.Fatalf("second agent exit: %v", err)
	}
}

// TestCNIInstallRefusesBadConflist: a conflist shm-cni would refuse (an
// unknown kind), one without a shm-cni plugin, one that is not JSON, or
// one chaining a plugin that is neither installed by the agent nor in the
// CNI binary directory stops the real agent with an error naming the
// problem, and nothing is installed: neither the conflist nor the binary.
func TestCNIInstallRefusesBadConflist(t *testing.T) {
	for _, tc := range []struct {
		name, conf, want string
	}{
		{"unknown kind", "", "kind"},
		{"no shm-cni plugin", `{"cniVersion":"1.1.0","name":"pods","plugins":[{"type":"bridge"}]}`, "no plugin of type shm-cni"},
		{"not JSON", `{"cniVersion":`, "install CNI config"},
		{"chained plugin missing", "bandwidth", "plugin 1: no bandwidth in"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			bins := builtBinaries(t)
			conf := []byte(tc.conf)
			switch tc.conf {
			case "":
				conf = testConflist(t, e.config(), func(m map[string]any) { m["kind"] = "bogus" })
			case "bandwidth":
				conf = testConflist(t, e.config(), nil, "bandwidth")
			}
			srcPath := filepath.Join(e.dir, "10-shm-cni.conflist")
			if err := os.WriteFile(srcPath, conf, 0o600); err != nil {
				t.Fatal(err)
			}
			binDst, confDst := filepath.Join(e.dir, "bin"), filepath.Join(e.dir, "net.d")
			p := startAgentProc(t, e,
				"--cni-binary-source="+filepath.Join(bins, "shm-cni"), "--cni-bin-dir="+binDst,
				"--cni-conf-source="+srcPath, "--cni-conf-dir="+confDst)
			var err error
			select {
			case err = <-p.exited:
			case <-time.After(callTimeout):
				t.Fatal("the agent did not exit")
			}
			if err == nil {
				t.Fatal("the agent exited with status 0")
			}
			if l := p.logs(); !strings.Contains(l, tc.want) {
				t.Errorf("the agent's log does not name %q:\n%s", tc.want, l)
			}
			for _, d := range []string{binDst, confDst} {
				if ents, _ := os.ReadDir(d); len(ents) != 0 {
					t.Errorf("%s holds %d files, want none", d, len(ents))
				}
			}
		})
	}
}

// TestCNIInstallShmConflist: with --cni-shm-conf-dir the real agent also
// writes the conflist there with the shm-cni plugin's kind set to shm and
// everything else as in the source, the chained portmap too (the CNI
// config of the runtime handler whose sandboxes attach shared-memory
// links); the main conflist keeps its kind. A kind libcni and shm-cni
// both accept, the pods of that handler get shm links without annotations.
func TestCNIInstallShmConflist(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "10-shm-cni.conflist")
	conf := testConflist(t, e.config(), func(m map[string]any) { m["mtu"] = 1400 }, "portmap")
	if err := os.WriteFile(src, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	confDst, shmDst := filepath.Join(e.dir, "net.d"), filepath.Join(e.dir, "net.d-shm")
	p := startAgentProc(t, e, "--cni-conf-source="+src, "--cni-conf-dir="+confDst, "--cni-shm-conf-dir="+shmDst)
	shmPath := filepath.Join(shmDst, "10-shm-cni.conflist")
	p.waitFor(t, "shm conflist", func() bool { _, err := os.Stat(shmPath); return err == nil })
	if b, err := os.ReadFile(filepath.Join(confDst, "10-shm-cni.conflist")); err != nil || !bytes.Equal(b, conf) {
		t.Errorf("main conflist: %s, %v; want the source's", b, err)
	}
	b, err := os.ReadFile(shmPath)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("shm conflist %s: %v", b, err)
	}
	if got.CNIVersion != "1.1.0" || got.Name != "pods" || len(got.Plugins) != 2 ||
		got.Plugins[0]["kind"] != "shm" || got.Plugins[0]["mtu"] != 1400.0 || got.Plugins[0]["agentSocket"] != e.config().SocketPath ||
		got.Plugins[1]["type"] != "portmap" || got.Plugins[1]["kind"] != nil {
		t.Errorf("shm conflist %s: want the source with kind shm, portmap chained as it was", b)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}
