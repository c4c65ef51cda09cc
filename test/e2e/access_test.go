package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// The access child: the test binary run again as another uid, by
// TestAgentSocketsRootOnly, connects to the socket its environment names
// and prints what happened on one line of stdout.
const (
	// accessChildEnv holds the socket path the child connects to.
	accessChildEnv = "SHM_E2E_ACCESS_CHILD"
	// accessResultPrefix starts the child's result line.
	accessResultPrefix = "ACCESS-RESULT "
	// nobody is the uid and gid the child runs as.
	nobody = 65534
)

// accessResult is what the child reports.
type accessResult struct {
	UID int `json:"uid"`
	// Errno is the connect error's errno, 0 when connect succeeded.
	Errno   int    `json:"errno"`
	Connect string `json:"connect,omitempty"`
	// Answer is the agent's answer to a status request, when connected
	// and asked.
	Answer *agentapi.Response `json:"answer,omitempty"`
	// Other is any other failure after connect.
	Other string `json:"other,omitempty"`
}

// TestAccessChild is the access child's body; it does nothing unless the
// environment makes the test binary the child.
func TestAccessChild(t *testing.T) {
	path := os.Getenv(accessChildEnv)
	if path == "" {
		t.Skip("only run as the child of TestAgentSocketsRootOnly")
	}
	res := accessResult{UID: os.Getuid()}
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		res.Connect = err.Error()
		var errno syscall.Errno
		if errors.As(err, &errno) {
			res.Errno = int(errno)
		}
	} else {
		defer conn.Close()
		if os.Getenv(accessChildEnv+"_ASK") != "" {
			res.Answer, err = askStatus(conn)
			if err != nil {
				res.Other = err.Error()
			}
		}
	}
	b, _ := json.Marshal(res)
	fmt.Println(accessResultPrefix + string(b))
}

// askStatus sends a status request on conn and returns the answer.
func askStatus(conn *net.UnixConn) (*agentapi.Response, error) {
	if err := conn.SetDeadline(time.Now().Add(time.Minute)); err != nil {
		return nil, err
	}
	if _, err := conn.Write([]byte(`{"version":1,"op":"status"}`)); err != nil {
		return nil, err
	}
	buf := make([]byte, agentapi.MaxMessageSize)
	n, err := conn.Read(buf)
	if err != nil {
		return nil, err
	}
	var resp agentapi.Response
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		return nil, fmt.Errorf("answer %q: %w", buf[:n], err)
	}
	return &resp, nil
}

// childBinary copies the test binary where another uid may run it.
func childBinary(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "e2e-access")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	bin := filepath.Join(dir, "e2e.test")
	out, err := os.OpenFile(bin, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return bin
}

// runAccessChild runs the child as uid and gid nobody against socket.
// viaFD hands it the socket as an O_PATH descriptor and has it connect to
// /proc/self/fd/3, past every directory on the way; dacOverride gives it
// CAP_DAC_OVERRIDE (so connect passes the file mode and only the agent's
// own check is left); ask has it send a status request.
func runAccessChild(t *testing.T, ctx context.Context, bin, socket string, viaFD, dacOverride, ask bool) accessResult {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^TestAccessChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), accessChildEnv+"="+socket)
	if ask {
		cmd.Env = append(cmd.Env, accessChildEnv+"_ASK=1")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: nobody, Gid: nobody, Groups: []uint32{}},
		Pdeathsig:  syscall.SIGKILL,
	}
	if dacOverride {
		cmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_DAC_OVERRIDE}
	}
	if viaFD {
		fd, err := unix.Open(socket, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "socket-path")
		defer f.Close()
		cmd.ExtraFiles = []*os.File{f} // fd 3 in the child
		cmd.Env = append(os.Environ(), accessChildEnv+"=/proc/self/fd/3")
		if ask {
			cmd.Env = append(cmd.Env, accessChildEnv+"_ASK=1")
		}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("access child: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), accessResultPrefix); ok {
			var res accessResult
			if err := json.Unmarshal([]byte(v), &res); err != nil {
				t.Fatalf("access child result %q: %v", v, err)
			}
			if res.UID != nobody {
				t.Fatalf("access child ran as uid %d, want %d", res.UID, nobody)
			}
			return res
		}
	}
	t.Fatalf("access child printed no result:\n%s\nstderr:\n%s", out, stderr.String())
	return accessResult{}
}

// TestAgentSocketsRootOnly checks that only root reaches the agent: its
// socket and a sandbox link's socket are root's sockets of mode 0600; a
// process running as another uid (nobody) cannot connect to either, by
// path or past the directories (an O_PATH descriptor of the socket), and
// one that can connect anyway (CAP_DAC_OVERRIDE) gets a permission error
// (code 105) from the agent. Afterwards the agent holds no more
// descriptors or goroutines than before, and the sandbox pod still works.
func TestAgentSocketsRootOnly(t *testing.T) {
	const codePermissionDenied = 105
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	p := addPod(t, ctx, n, "access", node.KindShm)
	if _, err := n.Transfer(ctx, n.HostPeer(), n.PodPeer(p), false, 64<<10); err != nil {
		t.Fatalf("traffic before: %v", err)
	}

	sockets := []struct{ name, path string }{{"agent socket", n.SocketPath()}, {"sandbox socket", p.SocketPath}}
	for _, s := range sockets {
		var st unix.Stat_t
		if err := unix.Lstat(s.path, &st); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got, want := st.Mode&unix.S_IFMT, uint32(unix.S_IFSOCK); got != want {
			t.Errorf("%s %s: type %#o, want a socket", s.name, s.path, got)
		}
		if got, want := st.Mode&0o7777, uint32(0o600); got != want {
			t.Errorf("%s %s: mode %#o, want %#o", s.name, s.path, got, want)
		}
		if st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s %s: owner %d:%d, want 0:0", s.name, s.path, st.Uid, st.Gid)
		}
	}

	bin := childBinary(t)
	settle, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	base, err := settledFootprint(settle, n, agentFootprint{fds: 1 << 30, memfdMaps: 1 << 30, goroutines: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sockets {
		for _, viaFD := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/viaFD=%v", s.name, viaFD), func(t *testing.T) {
				res := runAccessChild(t, ctx, bin, s.path, viaFD, false, true)
				t.Logf("uid %d: %+v", nobody, res)
				if res.Errno != int(unix.EACCES) {
					t.Errorf("uid %d connecting to the %s: %+v, want EACCES", nobody, s.name, res)
				}
			})
		}
	}
	t.Run("agent socket/CAP_DAC_OVERRIDE", func(t *testing.T) {
		for _, viaFD := range []bool{false, true} {
			res := runAccessChild(t, ctx, bin, n.SocketPath(), viaFD, true, true)
			t.Logf("uid %d with CAP_DAC_OVERRIDE, viaFD=%v: %+v (answer error: %v)", nobody, viaFD, res, res.Answer)
			switch {
			case res.Errno != 0:
				t.Errorf("uid %d with CAP_DAC_OVERRIDE could not connect: %+v", nobody, res)
			case res.Answer == nil:
				t.Errorf("no answer: %+v", res)
			case res.Answer.Error == nil:
				t.Errorf("uid %d served: %+v", nobody, res.Answer)
			default:
				e := res.Answer.Error
				if e.Code != codePermissionDenied || !strings.Contains(e.Error(), fmt.Sprintf("uid %d", nobody)) {
					t.Errorf("answer %v (code %d), want code %d naming uid %d", e, e.Code, codePermissionDenied, nobody)
				}
			}
		}
	})

	settle, cancel = context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	got, err := settledFootprint(settle, n, base)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("before: %v; after: %v", base, got)
	checkFootprint(t, "after the refused connections", got, base)
	if _, err := n.Transfer(ctx, n.HostPeer(), n.PodPeer(p), false, 1<<20); err != nil {
		t.Errorf("traffic after the refused connections: %v", err)
	}
	wantAttachments(t, ctx, n, p.RT.ContainerID)
}
