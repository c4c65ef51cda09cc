package agentapi

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestListenCreatesPrivateSocket checks the parent directory is created
// 0700 and the socket is 0600.
func TestListenCreatesPrivateSocket(t *testing.T) {
	dir := filepath.Join(shortTempDir(t), "run", "shm-cni")
	path := filepath.Join(dir, "agent.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, c := range []struct {
		path string
		want os.FileMode
	}{{dir, os.ModeDir | 0o700}, {path, os.ModeSocket | 0o600}} {
		fi, err := os.Lstat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode() & (os.ModeType | os.ModePerm); got != c.want {
			t.Errorf("%s: mode %v, want %v", filepath.Base(c.path), got, c.want)
		}
	}
}

// TestListenRefusesSharedDirectory: a socket directory others may write to
// is refused, and nothing is created in it.
func TestListenRefusesSharedDirectory(t *testing.T) {
	// os.ModeSticky, not 0o1000, sets the sticky bit (/tmp's mode).
	for _, mode := range []os.FileMode{0o777, 0o777 | os.ModeSticky, 0o770, 0o722} {
		dir := shortTempDir(t)
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "agent.sock")
		ln, err := Listen(path)
		if err == nil {
			ln.Close()
			t.Errorf("mode %v: Listen succeeded", mode)
			continue
		}
		if !strings.Contains(err.Error(), "writable by group or others") {
			t.Errorf("mode %v: error %q does not say why", mode, err)
		}
		if _, err := os.Lstat(path); !os.IsNotExist(err) {
			t.Errorf("mode %v: %s exists after the refusal (%v)", mode, path, err)
		}
	}
}

// TestListenExistingPath checks what Listen does with a file already at the
// path: a stale socket is replaced, anything else is refused and left alone.
func TestListenExistingPath(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		wantErr string // "" for success
	}{
		{"stale socket", func(t *testing.T, path string) {
			ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
			if err != nil {
				t.Fatal(err)
			}
			ln.SetUnlinkOnClose(false)
			ln.Close()
		}, ""},
		{"live socket", func(t *testing.T, path string) {
			ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
		}, "in use by a running agent"},
		{"regular file", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "is not a socket"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(shortTempDir(t), "agent.sock")
			tc.prepare(t, path)
			before, _ := os.Lstat(path)
			ln, err := Listen(path)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				ln.Close()
				return
			}
			if err == nil {
				ln.Close()
				t.Fatal("Listen succeeded")
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not contain %q", err, tc.wantErr)
			}
			after, err := os.Lstat(path)
			if err != nil || !os.SameFile(before, after) {
				t.Errorf("the existing file was touched: %v", err)
			}
		})
	}
}
