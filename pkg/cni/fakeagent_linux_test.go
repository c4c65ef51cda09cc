package cni

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// fakeAgent stands in for the real shm-agent (pkg/agent), which the e2e
// suite exercises separately: it serves the real agentapi protocol on a
// real socket, keeps the descriptors it is sent as the agent would, records
// what they are, and answers with addresses from its own small pool. Tests
// use it to see exactly what the plugin hands over.
type fakeAgent struct {
	path string
	srv  *agentapi.Server

	mu sync.Mutex
	// attachments are the live attachments by "containerID/ifName".
	attachments map[string]*fakeAttachment // +checklocks:mu
	// ops counts requests by op.
	ops map[string]int // +checklocks:mu
	// failAttach, when set, is the error every attach gets.
	failAttach error // +checklocks:mu
	// mangle, when set, edits every attach answer.
	mangle func(*agentapi.AttachResponse) // +checklocks:mu
	// notReady, when set, makes status answer not ready with this reason.
	notReady string // +checklocks:mu
	// next numbers the addresses handed out.
	next int // +checklocks:mu
	// gcValid is the valid list of the last gc.
	gcValid []agentapi.Attachment // +checklocks:mu
}

// fakeAttachment is one attachment the fake agent holds.
type fakeAttachment struct {
	req   agentapi.AttachRequest
	resp  agentapi.AttachResponse
	files []*os.File
	// tap is what the TAP fd is attached to; tapNetnsMatches says whether
	// the device lives in the request's netns.
	tap             tuntap.Info
	tapNetnsMatches bool
	// fdKinds describes each descriptor: "memfd sealed", "eventfd", or
	// what else it was.
	fdKinds []string
}

// Fixed MACs of the fake agent's answers.
const (
	fakeGatewayMAC = "02:00:5e:00:00:01"
	fakePodMACBase = "02:00:5e:00:01:"
)

// startFakeAgent serves a fake agent until the test ends.
func startFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	dir, err := os.MkdirTemp("", "shmcni")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a := &fakeAgent{path: filepath.Join(dir, "agent.sock"), attachments: map[string]*fakeAttachment{}, ops: map[string]int{}}
	ln, err := agentapi.Listen(a.path)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	a.srv, err = agentapi.NewServer(ln, agentapi.HandlerFunc(a.serve), log)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.srv.Serve(context.Background()) }()
	t.Cleanup(func() {
		a.srv.Close()
		if err := <-done; err != nil {
			t.Errorf("fake agent Serve: %v", err)
		}
		a.mu.Lock()
		defer a.mu.Unlock()
		for _, at := range a.attachments {
			closeAll(at.files)
		}
		a.attachments = nil
	})
	return a
}

// stop stops serving: the socket goes away, as when the agent is down.
func (a *fakeAgent) stop() { a.srv.Close() }

func (a *fakeAgent) serve(_ context.Context, req *agentapi.Request, files []*os.File) (*agentapi.Response, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ops[req.Op]++
	switch req.Op {
	case agentapi.OpAttach:
		return a.attachLocked(req.Attach, files)
	case agentapi.OpDetach:
		k := req.Detach.ContainerID + "/" + req.Detach.IfName
		if at, ok := a.attachments[k]; ok {
			closeAll(at.files)
			delete(a.attachments, k)
		}
		return nil, nil
	case agentapi.OpCheck:
		at, ok := a.attachments[req.Check.ContainerID+"/"+req.Check.IfName]
		if !ok {
			return nil, agentapi.NewError(agentapi.CodeNoSuchAttachment, "no such attachment", req.Check.ContainerID+"/"+req.Check.IfName)
		}
		for _, ip := range req.Check.IPs {
			if !at.hasAddr(ip) {
				return nil, agentapi.NewError(agentapi.CodeNoSuchAttachment, "address not attached", ip)
			}
		}
		return nil, nil
	case agentapi.OpStatus:
		return &agentapi.Response{Status: &agentapi.StatusResponse{Ready: a.notReady == "", Reason: a.notReady, Attachments: len(a.attachments)}}, nil
	case agentapi.OpGC:
		a.gcValid = req.GC.Valid
		valid := map[string]bool{}
		for _, v := range req.GC.Valid {
			valid[v.ContainerID+"/"+v.IfName] = true
		}
		resp := &agentapi.GCResponse{Released: []agentapi.Attachment{}}
		for k, at := range a.attachments {
			if !valid[k] {
				closeAll(at.files)
				delete(a.attachments, k)
				resp.Released = append(resp.Released, agentapi.Attachment{ContainerID: at.req.ContainerID, IfName: at.req.IfName})
			}
		}
		return &agentapi.Response{GC: resp}, nil
	}
	closeAll(files)
	return nil, fmt.Errorf("fake agent: op %s not handled", req.Op)
}

// +checklocks:a.mu
func (a *fakeAgent) attachLocked(req *agentapi.AttachRequest, files []*os.File) (*agentapi.Response, error) {
	if a.failAttach != nil {
		closeAll(files)
		return nil, a.failAttach
	}
	at := &fakeAttachment{req: *req, files: files}
	for _, f := range files {
		at.fdKinds = append(at.fdKinds, describeFD(f))
	}
	if req.Kind == agentapi.KindTap {
		info, err := tuntap.Inspect(int(files[0].Fd()))
		if err == nil {
			at.tap = info
			at.tapNetnsMatches = tapInNetns(int(files[0].Fd()), req.Netns)
		}
	}
	a.next++
	n := a.next
	ips := req.IPs
	if len(ips) == 0 {
		ips = []string{fmt.Sprintf("10.99.%d.%d/32", n/250, n%250+1), fmt.Sprintf("fd00:99::%x/128", n)}
	}
	at.resp = agentapi.AttachResponse{MTU: req.MTU, GatewayMAC: fakeGatewayMAC}
	for _, ip := range ips {
		gw := "169.254.1.1"
		if strings.Contains(ip, ":") {
			gw = "fe80::1"
		}
		at.resp.IPs = append(at.resp.IPs, agentapi.IPConfig{Address: ip, Gateway: gw})
	}
	if req.Kind == agentapi.KindShm {
		at.resp.MAC = fmt.Sprintf("%s%02x", fakePodMACBase, n%256)
		at.resp.SocketPath = fmt.Sprintf("/run/shm-cni/sandbox/%s-%s.sock", req.ContainerID, req.IfName)
	}
	k := req.ContainerID + "/" + req.IfName
	if old, ok := a.attachments[k]; ok {
		closeAll(old.files)
	}
	a.attachments[k] = at
	resp := at.resp
	if a.mangle != nil {
		a.mangle(&resp)
	}
	return &agentapi.Response{Attach: &resp}, nil
}

// hasAddr reports whether ip (a CIDR) is one of the attachment's addresses,
// whatever the prefix length.
func (at *fakeAttachment) hasAddr(ip string) bool {
	want, err := netip.ParsePrefix(ip)
	if err != nil {
		return false
	}
	for _, c := range at.resp.IPs {
		if p, err := netip.ParsePrefix(c.Address); err == nil && p.Addr() == want.Addr() {
			return true
		}
	}
	return false
}

// attachment returns a copy of the attachment of containerID/ifName.
func (a *fakeAgent) attachment(containerID, ifName string) (fakeAttachment, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	at, ok := a.attachments[containerID+"/"+ifName]
	if !ok {
		return fakeAttachment{}, false
	}
	return *at, true
}

// dupFile duplicates the i-th descriptor the attachment came with, under
// the agent's lock: the agent closes its files when a DEL detaches, on its
// own goroutine, and the race detector sees no order between that and a
// test's use of them through the socket's system calls.
func (a *fakeAgent) dupFile(containerID, ifName string, i int) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	at, ok := a.attachments[containerID+"/"+ifName]
	if !ok || i >= len(at.files) {
		return -1, fmt.Errorf("no descriptor %d of %s/%s", i, containerID, ifName)
	}
	rc, err := at.files[i].SyscallConn()
	if err != nil {
		return -1, err
	}
	dup := -1
	if cerr := rc.Control(func(fd uintptr) { dup, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); cerr != nil {
		return -1, cerr
	}
	return dup, err
}

// forget drops an attachment as an agent that lost its state would.
func (a *fakeAgent) forget(containerID, ifName string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if at, ok := a.attachments[containerID+"/"+ifName]; ok {
		closeAll(at.files)
		delete(a.attachments, containerID+"/"+ifName)
	}
}

func (a *fakeAgent) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.attachments)
}

func (a *fakeAgent) opCount(op string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ops[op]
}

func (a *fakeAgent) setFailAttach(err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failAttach = err
}

func (a *fakeAgent) setMangle(f func(*agentapi.AttachResponse)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.mangle = f
}

func (a *fakeAgent) setNotReady(reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.notReady = reason
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// describeFD says what f is: "memfd sealed" (a memfd with the queue's
// seals), "eventfd", or its /proc link.
func describeFD(f *os.File) string {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		return "unreadable: " + err.Error()
	}
	switch {
	case link == "anon_inode:[eventfd]":
		return "eventfd"
	case strings.HasPrefix(link, "/memfd:"):
		seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
		want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
		if err != nil || seals&want != want {
			return fmt.Sprintf("memfd seals %#x (%v)", seals, err)
		}
		return "memfd sealed"
	}
	return link
}

// tapInNetns reports whether the device of TAP fd lives in the netns at
// path.
func tapInNetns(fd int, path string) bool {
	nsf, err := tuntap.NetNS(fd)
	if err != nil {
		return false
	}
	defer nsf.Close()
	var a, b unix.Stat_t
	if unix.Fstat(int(nsf.Fd()), &a) != nil || unix.Stat(path, &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}
