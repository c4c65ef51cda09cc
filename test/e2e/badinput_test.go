package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// Codes of the agent protocol the bad-input tests expect, beside those of
// lifecycle_test.go.
const (
	codeDecodingFailure = 6
	codeVersionMismatch = 104
)

// badRounds is how often TestAgentSocketBadInput sends its whole table: a
// resource the agent leaks per bad request shows as growth over the
// rounds.
const badRounds = 4

// sendMode says how rawAgentCall uses the connection.
type sendMode int

const (
	// sendAndRead sends the record and reads the answer.
	sendAndRead sendMode = iota
	// sendNothing shuts the write side without sending a record (a
	// client that connects and hangs up) and reads the answer.
	sendNothing
	// sendAndClose sends the record and closes the connection without
	// reading the answer.
	sendAndClose
)

// rawAgentCall connects to the agent socket at path, sends payload with the
// descriptors of files as one record, bypassing every check agentapi.Call
// makes, and returns the answer (nil for sendAndClose).
func rawAgentCall(path string, payload []byte, files []*os.File, mode sendMode) (*agentapi.Response, error) {
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	// A hang guard: the agent answers every record.
	if err := conn.SetDeadline(time.Now().Add(time.Minute)); err != nil {
		return nil, err
	}
	if mode == sendNothing {
		if err := conn.CloseWrite(); err != nil {
			return nil, fmt.Errorf("shutdown: %w", err)
		}
	} else {
		var oob []byte
		if len(files) > 0 {
			fds := make([]int, len(files))
			for i, f := range files {
				fds[i] = int(f.Fd())
			}
			oob = unix.UnixRights(fds...)
		}
		if _, _, err := conn.WriteMsgUnix(payload, oob, nil); err != nil {
			return nil, fmt.Errorf("send %d bytes, %d fds: %w", len(payload), len(files), err)
		}
		if mode == sendAndClose {
			return nil, nil
		}
	}
	buf := make([]byte, agentapi.MaxMessageSize)
	n, err := conn.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("receive: %w", err)
	}
	var resp agentapi.Response
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		return nil, fmt.Errorf("answer %q: %w", buf[:n], err)
	}
	return &resp, nil
}

// fdMaker makes the descriptors of one bad request, in a node with pod
// netns x and another netns other. The test closes them after sending.
type fdMaker func(t *testing.T, x, other ns.NetNS) []*os.File

// fileOf wraps a raw descriptor.
func fileOf(t *testing.T, fd int, name string) *os.File {
	t.Helper()
	return os.NewFile(uintptr(fd), name)
}

func regularFile(t *testing.T, _, _ ns.NetNS) []*os.File {
	f, err := os.CreateTemp(t.TempDir(), "regular")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	return []*os.File{f}
}

func pipeEnd(t *testing.T, _, _ ns.NetNS) []*os.File {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	return []*os.File{r}
}

func eventFD(t *testing.T, _, _ ns.NetNS) []*os.File {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	return []*os.File{fileOf(t, fd, "eventfd")}
}

func socketFD(t *testing.T, _, _ ns.NetNS) []*os.File {
	p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1])
	return []*os.File{fileOf(t, p[0], "socket")}
}

// memfd makes a memfd of size bytes, sealed against resizing or not.
func memfd(t *testing.T, size int64, sealed bool) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("bad-input", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	f := fileOf(t, fd, "memfd")
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if sealed {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// tapIn opens a TAP (or TUN) device called name in the pod netns, or with inOther in the other netns; the device goes
// with the last descriptor.
func tapIn(inOther bool, name string, opts tuntap.Options) fdMaker {
	return func(t *testing.T, x, other ns.NetNS) []*os.File {
		t.Helper()
		target := x
		if inOther {
			target = other
		}
		var f *os.File
		if err := target.Do(func(ns.NetNS) error {
			var err error
			f, err = tuntap.Open(name, opts)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return []*os.File{f}
	}
}

// many returns n descriptors of one kind.
func many(n int, mk fdMaker) fdMaker {
	return func(t *testing.T, x, other ns.NetNS) []*os.File {
		var out []*os.File
		for range n {
			out = append(out, mk(t, x, other)...)
		}
		return out
	}
}

// badSizes are the queue sizes the shm attach requests name.
var badSizes = queue.DefaultSizes()

// pairWith returns a real queue pair of sizes with the descriptor at index
// i (wire order: TX Data, Event, TxPipe, RxPipe, SharedData, then RX's)
// replaced by what mk makes; i < 0 replaces nothing.
func pairWith(sizes queue.Sizes, i int, mk fdMaker) fdMaker {
	return func(t *testing.T, x, other ns.NetNS) []*os.File {
		t.Helper()
		p, err := queue.NewPair(sizes)
		if err != nil {
			t.Fatal(err)
		}
		var out []*os.File
		for j, fd := range p.FDs() {
			if j == i {
				unix.Close(fd)
				out = append(out, mk(t, x, other)...)
				continue
			}
			out = append(out, fileOf(t, fd, "queue"))
		}
		return out
	}
}

// attachJSON is an attach request of kind for container id in netns.
func attachJSON(t *testing.T, id, netns, kind string) []byte {
	t.Helper()
	a := &agentapi.AttachRequest{ContainerID: id, IfName: node.IfName, Netns: netns, Network: node.NetworkName, Kind: kind, MTU: 1500}
	if kind == node.KindShm {
		a.Queue = &agentapi.QueueSizes{DataSize: badSizes.DataSize, PipeSize: badSizes.PipeSize, BufferSize: badSizes.BufferSize}
	}
	b, err := json.Marshal(&agentapi.Request{Version: agentapi.Version, Op: agentapi.OpAttach, Attach: a})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// agentThreads returns the number of threads of process pid.
func agentThreads(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("no Threads line in /proc/" + strconv.Itoa(pid) + "/status")
}

// TestAgentSocketBadInput sends the real agent, on its own socket, records
// no shm-cni would send: malformed and truncated JSON, an unknown version
// or op, too few, too many and more than 16 descriptors, descriptors of the
// wrong kind (a regular file, pipe, eventfd or socket where a memfd or a
// TAP fd belongs, an unsealed or wrongly sized memfd, a TUN device, a TAP
// device of another netns), oversized records, a connection that sends
// nothing and one that goes before the answer. Each answer is an error with
// its CNI code naming the problem; none leaves an attachment, an address, a
// device or a socket behind; over several rounds of the whole table the
// agent's descriptors, memfd mappings, goroutines and threads do not grow;
// and a normal ADD through the real shm-cni still works, also while a
// connection that sends nothing is open.
func TestAgentSocketBadInput(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	x, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	other, err := n.NewPodNetNS()
	if err != nil {
		t.Fatal(err)
	}
	status := []byte(`{"version":1,"op":"status"}`)
	pad := func(b []byte, size int) []byte {
		return append(append([]byte{}, b...), []byte(strings.Repeat(" ", size-len(b)))...)
	}
	tap := func(id string) []byte { return attachJSON(t, id, x.Path(), node.KindTap) }
	shm := func(id string) []byte { return attachJSON(t, id, x.Path(), node.KindShm) }
	smaller := queue.Sizes{DataSize: 64 << 10, PipeSize: badSizes.PipeSize, BufferSize: badSizes.BufferSize}
	const (
		txData, txEvent, txPipe, rxShared = 0, 1, 2, 9
	)

	cases := []struct {
		name    string
		payload []byte
		fds     fdMaker
		mode    sendMode
		// accept: the agent takes the request (a variant it supports);
		// the test detaches it again.
		accept bool
		code   uint
		sub    []string // substrings of the error
	}{
		// The record.
		{name: "empty record", payload: []byte{}, code: codeDecodingFailure, sub: []string{"cannot decode request"}},
		{name: "truncated JSON", payload: status[:len(status)-5], code: codeDecodingFailure, sub: []string{"cannot decode request"}},
		{name: "truncated attach", payload: tap("e2e-bad-trunc")[:60], fds: tapIn(false, "bad0", tuntap.Options{VnetHdr: true}), code: codeDecodingFailure, sub: []string{"cannot decode request"}},
		{name: "not JSON", payload: []byte("\x00\xffGET / HTTP/1.1\r\n"), code: codeDecodingFailure, sub: []string{"cannot decode request"}},
		{name: "JSON array", payload: []byte(`[{"version":1,"op":"status"}]`), code: codeDecodingFailure, sub: []string{"cannot decode request"}},
		{name: "trailing data", payload: append(append([]byte{}, status...), "{}"...), code: codeDecodingFailure, sub: []string{"after"}},
		{name: "no version", payload: []byte(`{"op":"status"}`), code: codeVersionMismatch, sub: []string{"version 0"}},
		{name: "version 2", payload: []byte(`{"version":2,"op":"status"}`), code: codeVersionMismatch, sub: []string{"version 2"}},
		{name: "unknown op", payload: []byte(`{"version":1,"op":"teleport"}`), code: codeInvalidConfig, sub: []string{`op: "teleport"`}},
		{name: "unknown field", payload: []byte(`{"version":1,"op":"status","beam":true}`), code: codeUnsupportedField, sub: []string{`"beam"`}},
		{name: "invalid attach fields", payload: []byte(`{"version":1,"op":"attach","attach":{"containerID":"../x","ifName":"a/b","netns":"rel","network":"pods","kind":"tap"}}`),
			fds: tapIn(false, "bad0", tuntap.Options{VnetHdr: true}), code: codeInvalidConfig, sub: []string{"attach.containerID", "attach.ifName", "attach.netns"}},
		{name: "oversized", payload: pad(status, agentapi.MaxMessageSize+1), code: codeDecodingFailure, sub: []string{"65537 bytes", "limit of 65536"}},
		{name: "oversized with fds", payload: pad(tap("e2e-bad-big"), 100<<10), fds: many(4, pipeEnd), code: codeDecodingFailure, sub: []string{"limit of 65536"}},
		{name: "nothing sent", mode: sendNothing, code: codeDecodingFailure, sub: []string{"cannot decode request"}},

		// Descriptor counts.
		{name: "tap without fd", payload: tap("e2e-bad-nofd"), code: codeInvalidConfig, sub: []string{`attach kind "tap" needs 1 file descriptors, got 0`}},
		{name: "tap with 2 fds", payload: tap("e2e-bad-2fd"), fds: func(t *testing.T, x, o ns.NetNS) []*os.File {
			return append(tapIn(false, "bad1", tuntap.Options{VnetHdr: true})(t, x, o), tapIn(false, "bad2", tuntap.Options{VnetHdr: true})(t, x, o)...)
		}, code: codeInvalidConfig, sub: []string{"needs 1 file descriptors, got 2"}},
		{name: "shm with 9 fds", payload: shm("e2e-bad-9fd"), fds: func(t *testing.T, x, o ns.NetNS) []*os.File {
			fs := pairWith(badSizes, -1, nil)(t, x, o)
			for _, f := range fs[9:] {
				f.Close()
			}
			return fs[:9]
		}, code: codeInvalidConfig, sub: []string{`attach kind "shm" needs 10 file descriptors, got 9`}},
		{name: "shm with 11 fds", payload: shm("e2e-bad-11fd"), fds: func(t *testing.T, x, o ns.NetNS) []*os.File {
			return append(pairWith(badSizes, -1, nil)(t, x, o), eventFD(t, x, o)...)
		}, code: codeInvalidConfig, sub: []string{"needs 10 file descriptors, got 11"}},
		{name: "status with fds", payload: status, fds: many(3, eventFD), code: codeInvalidConfig, sub: []string{`op "status" needs 0 file descriptors, got 3`}},
		{name: "17 fds", payload: shm("e2e-bad-17fd"), fds: many(17, pipeEnd), code: codeInvalidConfig, sub: []string{"at most 16"}},
		{name: "64 fds", payload: status, fds: many(64, eventFD), code: codeInvalidConfig, sub: []string{"at most 16"}},
		{name: "gone before the answer", payload: shm("e2e-bad-gone"), fds: many(3, pipeEnd), mode: sendAndClose},

		// Descriptors of the wrong kind for a tap link.
		{name: "tap: regular file", payload: tap("e2e-bad-tapfile"), fds: regularFile, code: codeInvalidConfig, sub: []string{"tap fd"}},
		{name: "tap: pipe", payload: tap("e2e-bad-tappipe"), fds: pipeEnd, code: codeInvalidConfig, sub: []string{"tap fd"}},
		{name: "tap: eventfd", payload: tap("e2e-bad-tapevent"), fds: eventFD, code: codeInvalidConfig, sub: []string{"tap fd"}},
		{name: "tap: socket", payload: tap("e2e-bad-tapsock"), fds: socketFD, code: codeInvalidConfig, sub: []string{"tap fd"}},
		{name: "tap: memfd", payload: tap("e2e-bad-tapmemfd"), fds: func(t *testing.T, _, _ ns.NetNS) []*os.File { return []*os.File{memfd(t, 4096, true)} }, code: codeInvalidConfig, sub: []string{"tap fd"}},
		// A TAP device without virtio-net header is a variant the agent
		// drives (it records the mode and re-opens the device so).
		{name: "tap: no vnet header", payload: tap("e2e-bad-novnet"), fds: tapIn(false, "badtap2", tuntap.Options{}), accept: true},
		{name: "tap: TUN device", payload: tap("e2e-bad-tun"), fds: tapIn(false, "badtun0", tuntap.Options{TUN: true, VnetHdr: true}), code: codeInvalidConfig, sub: []string{"tap fd", "TUN"}},
		{name: "tap: device of another netns", payload: tap("e2e-bad-otherns"), fds: tapIn(true, "badtap0", tuntap.Options{VnetHdr: true}), code: codeInvalidConfig, sub: []string{"tap fd", "attach.netns"}},

		// Descriptors of the wrong kind for a shm link.
		{name: "shm: regular file as data", payload: shm("e2e-bad-shmfile"), fds: pairWith(badSizes, txData, regularFile), code: codeInvalidConfig, sub: []string{"data region", "memfd"}},
		{name: "shm: pipe as data", payload: shm("e2e-bad-shmpipe"), fds: pairWith(badSizes, txData, pipeEnd), code: codeInvalidConfig, sub: []string{"data region", "not a memory file"}},
		{name: "shm: socket as txPipe", payload: shm("e2e-bad-shmsock"), fds: pairWith(badSizes, txPipe, socketFD), code: codeInvalidConfig, sub: []string{"txPipe region", "not a memory file"}},
		{name: "shm: TAP fd as sharedData", payload: shm("e2e-bad-shmtap"), fds: pairWith(badSizes, rxShared, tapIn(false, "badtap1", tuntap.Options{})), code: codeInvalidConfig, sub: []string{"sharedData region", "not a memory file"}},
		{name: "shm: unsealed memfd", payload: shm("e2e-bad-unsealed"), fds: pairWith(badSizes, txData, func(t *testing.T, _, _ ns.NetNS) []*os.File {
			return []*os.File{memfd(t, int64(badSizes.DataSize), false)}
		}), code: codeInvalidConfig, sub: []string{"data region", "not sealed"}},
		{name: "shm: memfd of an odd size", payload: shm("e2e-bad-oddsize"), fds: pairWith(badSizes, txData, func(t *testing.T, _, _ ns.NetNS) []*os.File {
			return []*os.File{memfd(t, 4100, true)}
		}), code: codeInvalidConfig, sub: []string{"data region", "size 4100"}},
		{name: "shm: regions smaller than the request", payload: shm("e2e-bad-smaller"), fds: pairWith(smaller, -1, nil), code: codeInvalidConfig, sub: []string{"attach.queue", "data region", "size 65536, want 4194304 (dataSize)"}},
		{name: "shm: memfd as event", payload: shm("e2e-bad-memevent"), fds: pairWith(badSizes, txEvent, func(t *testing.T, _, _ ns.NetNS) []*os.File {
			return []*os.File{memfd(t, 4096, true)}
		}), code: codeInvalidConfig, sub: []string{"event", "eventfd"}},
		{name: "shm: pipe as event", payload: shm("e2e-bad-pipeevent"), fds: pairWith(badSizes, txEvent, pipeEnd), code: codeInvalidConfig, sub: []string{"event", "eventfd"}},
	}

	// The agent's resting footprint, after a warm-up that grows the
	// pools and caches a pod and a bad request grow for good.
	warmUp := func() {
		for _, kind := range []string{node.KindTap, node.KindShm} {
			p := addPod(t, ctx, n, "warm-"+kind, kind)
			if err := n.DeletePod(ctx, p); err != nil {
				t.Fatal(err)
			}
		}
	}
	warmUp()
	pid := n.Agent().PID()
	run := func(round int) {
		for _, tc := range cases {
			t.Run(fmt.Sprintf("%s/%d", tc.name, round), func(t *testing.T) {
				var files []*os.File
				if tc.fds != nil {
					files = tc.fds(t, x, other)
				}
				resp, err := rawAgentCall(n.SocketPath(), tc.payload, files, tc.mode)
				for _, f := range files {
					f.Close()
				}
				if err != nil {
					t.Fatal(err)
				}
				switch {
				case tc.mode == sendAndClose:
				case resp.Version != agentapi.Version:
					t.Errorf("answer version %d, want %d", resp.Version, agentapi.Version)
				case tc.accept:
					if resp.Error != nil || resp.Attach == nil {
						t.Errorf("refused: %v, want an attachment", resp.Error)
					}
				case resp.Error == nil:
					t.Errorf("accepted: %+v, want code %d", resp, tc.code)
				default:
					t.Logf("answer: code %d: %v", resp.Error.Code, resp.Error)
					if resp.Error.Code != tc.code {
						t.Errorf("code %d (%v), want %d", resp.Error.Code, resp.Error, tc.code)
					}
					for _, s := range tc.sub {
						if !strings.Contains(resp.Error.Error(), s) {
							t.Errorf("error %q does not name %q", resp.Error, s)
						}
					}
				}
				if died, err := n.AgentExited(); died {
					t.Fatalf("the agent exited: %v", err)
				}
				// An accepted bad attach must not stay for the next case.
				var probe struct {
					Attach *agentapi.AttachRequest `json:"attach"`
				}
				if json.Unmarshal(tc.payload, &probe) == nil && probe.Attach != nil && probe.Attach.ContainerID != "" && (resp == nil || resp.Error == nil) {
					if _, err := agentapi.Call(ctx, n.SocketPath(), &agentapi.Request{Op: agentapi.OpDetach,
						Detach: &agentapi.DetachRequest{ContainerID: probe.Attach.ContainerID, IfName: probe.Attach.IfName}}, nil); err != nil {
						t.Errorf("detach %s: %v", probe.Attach.ContainerID, err)
					}
				}
				wantNoAttachments(t, ctx, n)
				wantLinks(t, x, "lo")
				wantLinks(t, other, "lo")
				if ents, err := os.ReadDir(n.SandboxDir()); err != nil || len(ents) != 0 {
					t.Errorf("sandbox dir: %d entries (%v), want none", len(ents), err)
				}
			})
		}
	}

	// Round 0 grows what a first bad request of each kind grows; the
	// footprint after it is the base the later rounds must not exceed.
	run(0)
	settle, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	base, err := settledFootprint(settle, n, agentFootprint{fds: 1 << 30, memfdMaps: 1 << 30, goroutines: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	baseThreads, err := agentThreads(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after round 0: %v, %d threads", base, baseThreads)
	for r := 1; r <= badRounds; r++ {
		run(r)
	}
	settle, cancel = context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	got, err := settledFootprint(settle, n, base)
	if err != nil {
		t.Fatal(err)
	}
	threads, err := agentThreads(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("after %d more rounds (%d bad requests): %v, %d threads", badRounds, badRounds*len(cases), got, threads)
	checkFootprint(t, "after the rounds", got, base)
	if got.memfdMaps != 0 {
		t.Errorf("agent memfd mappings: %d, want 0 (no pod)", got.memfdMaps)
	}
	// Go keeps idle threads; a thread per bad request would add
	// badRounds*len(cases). The slack is what the Go runtime may add for
	// syscalls of its own (GOMAXPROCS of a 2-core machine, and more).
	if slack := 8; threads > baseThreads+slack {
		t.Errorf("agent threads: %d after %d bad requests, %d before", threads, badRounds*len(cases), baseThreads)
	}

	// A connection that sends nothing does not hold the agent up: normal
	// ADDs of each kind work while it is open, with traffic.
	idle, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: n.SocketPath(), Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	for _, kind := range []string{node.KindTap, node.KindShm} {
		p := addPod(t, ctx, n, "after-"+kind, kind)
		if _, err := n.Transfer(ctx, n.HostPeer(), n.PodPeer(p), false, 1<<20); err != nil {
			t.Errorf("traffic to a %s pod after the bad input: %v", kind, err)
		}
		if err := n.DeletePod(ctx, p); err != nil {
			t.Errorf("delete %s pod: %v", kind, err)
		}
	}
	wantNoAttachments(t, ctx, n)
}
