package agent

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/ipam"
)

// TestRestartReadopts: after an agent restart, a tap attachment whose
// device still exists is re-adopted (traffic flows again, CHECK passes), a
// shm attachment gets its socket back, and one whose netns was removed
// meanwhile is released.
func TestRestartReadopts(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	p := r.newTapPod(t, "pod-a", true)
	gone := r.newTapPod(t, "pod-gone", false)
	shm := r.attachShm(t, "sandbox-1")
	if err := r.stop(); err != nil {
		t.Fatalf("first agent: %v", err)
	}
	if _, err := os.Stat(shm.SocketPath); !os.IsNotExist(err) {
		t.Errorf("socket %s left by a stopped agent (%v)", shm.SocketPath, err)
	}
	// pod-gone's netns goes away while no agent runs.
	gone.ns.Close()
	if err := unmountNS(gone.ns.Path()); err != nil {
		t.Fatal(err)
	}

	r2 := e.start(t)
	if got, want := r2.router.Links(), []string{"pod-a/eth0"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("router links after restart %v, want %v", got, want)
	}
	if _, ok := r2.ipam.Get(ipam.Owner{ContainerID: "pod-gone", IfName: "eth0"}); ok {
		t.Error("addresses of the attachment whose netns is gone were not released")
	}
	st := r2.mustCall(t, &agentapi.Request{Op: agentapi.OpStatus}, nil).Status
	if st.Attachments != 2 {
		t.Errorf("status after restart %+v, want 2 attachments", st)
	}
	r2.mustCall(t, &agentapi.Request{Op: agentapi.OpCheck, Check: &agentapi.CheckRequest{ContainerID: "pod-a", IfName: "eth0"}}, nil)
	ln := listenIn(t, p.ns, p.addr(true))
	dst := netip.MustParseAddrPort(ln.Addr().String())
	transfer(t, ln, func() (net.Conn, error) { return dialFrom(e.host, dst) }, 1<<20)

	sb, err := dialSandbox(t, shm.SocketPath)
	if err != nil {
		t.Fatalf("dial the re-adopted shm link: %v", err)
	}
	transfer(t, ln, func() (net.Conn, error) { return sb.dial(dst) }, 1<<20)
}

// unmountNS unmounts and removes a netns bind mount.
func unmountNS(path string) error {
	if err := unixUnmount(path); err != nil {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	return os.Remove(path)
}

// TestMetricsAndHealth: /healthz and /readyz answer, /metrics shows the
// links' counters after traffic, the attachment gauge and the attach
// latency histogram, and /attachments lists the links.
func TestMetricsAndHealth(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	a := r.newTapPod(t, "pod-a", true)
	b := r.newTapPod(t, "pod-b", true)
	ln := listenIn(t, b.ns, b.addr(true))
	dst := netip.MustParseAddrPort(ln.Addr().String())
	transfer(t, ln, func() (net.Conn, error) { return dialFrom(a.ns, dst) }, 1<<20)
	r.attachShm(t, "sandbox-1")

	base := "http://" + r.MetricsAddr().String()
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, _ := httpGet(t, base+path); code != http.StatusOK {
			t.Errorf("GET %s: %d, want 200", path, code)
		}
	}
	code, body := httpGet(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d", code)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse metrics: %v", err)
	}
	value := func(name string, labels map[string]string) (float64, bool) {
		f := fams[name]
		if f == nil {
			return 0, false
		}
	metrics:
		for _, m := range f.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if got[k] != v {
					continue metrics
				}
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue(), true
			case m.Gauge != nil:
				return m.GetGauge().GetValue(), true
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
		return 0, false
	}
	podA := map[string]string{"container_id": "pod-a", "ifname": "eth0", "kind": "tap", "namespace": "default", "pod": "pod-pod-a"}
	for _, name := range []string{"shm_cni_link_receive_packets_total", "shm_cni_link_receive_bytes_total",
		"shm_cni_link_transmit_packets_total", "shm_cni_link_transmit_bytes_total"} {
		// pod a sent 1 MiB: more than 1 MiB of bytes, in TCP
		// super-packets of up to 64 KiB that cross the router whole, and
		// as many ACKs back: more than 1 MiB / 64 KiB = 16 packets.
		v, ok := value(name, podA)
		if !ok || v < 16 {
			t.Errorf("%s%v = %v (present %t), want at least 16", name, podA, v, ok)
		}
	}
	if v, ok := value("shm_cni_link_receive_bytes_total", podA); v < 1<<20 {
		t.Errorf("pod a receive bytes %v (present %t), want at least 1 MiB", v, ok)
	}
	for _, name := range []string{"shm_cni_link_protocol_violations_total", "shm_cni_link_endpoint_drops_total", "shm_cni_link_drops_total"} {
		if _, ok := value(name, podA); !ok {
			t.Errorf("%s%v missing", name, podA)
		}
	}
	if v, ok := value("shm_cni_link_up", map[string]string{"container_id": "sandbox-1", "kind": "shm"}); !ok || v != 0 {
		t.Errorf("shm_cni_link_up of the unconnected sandbox = %v (present %t), want 0", v, ok)
	}
	for kind, want := range map[string]float64{"tap": 2, "shm": 1} {
		if v, _ := value("shm_cni_attachments", map[string]string{"kind": kind}); v != want {
			t.Errorf("shm_cni_attachments{kind=%q} = %v, want %v", kind, v, want)
		}
	}
	if v, _ := value("shm_cni_attach_duration_seconds", map[string]string{"kind": "tap", "result": "ok"}); v != 2 {
		t.Errorf("attach duration samples for tap = %v, want 2", v)
	}
	if code, body := httpGet(t, base+"/attachments"); code != http.StatusOK || !strings.Contains(body, `"containerID": "sandbox-1"`) {
		t.Errorf("GET /attachments: %d %s", code, body)
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// TestNoLeakAfterCycles: 100 attach/detach cycles (tap pods, and shm links
// a sandbox connects to) leave no goroutine, descriptor, link, socket or
// allocation behind.
func TestNoLeakAfterCycles(t *testing.T) {
	e := newEnv(t)
	r := e.start(t)
	// A pod namespace the TAP devices are created in, one at a time.
	podNS := testutil.NewNS(t)
	cycle := func(i int) {
		if i%2 == 0 {
			var f *os.File
			testutil.Do(t, podNS, func() error {
				var err error
				f, err = openTestTAP("eth0")
				return err
			})
			cid := fmt.Sprintf("tap-%d", i)
			r.mustCall(t, &agentapi.Request{Op: agentapi.OpAttach, Attach: &agentapi.AttachRequest{
				ContainerID: cid, IfName: "eth0", Netns: podNS.Path(), Network: "shm-test", Kind: agentapi.KindTap,
			}}, []int{fileFD(f)})
			f.Close()
			r.detach(t, cid, "eth0")
			return
		}
		cid := fmt.Sprintf("shm-%d", i)
		resp := r.attachShm(t, cid)
		sb, err := dialSandbox(t, resp.SocketPath)
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		sb.close()
		r.detach(t, cid, "eth0")
	}
	cycle(0) // warm up lazily created runtime resources
	cycle(1)
	fds, goroutines := openFDs(t), runtime.NumGoroutine()
	for i := 2; i < 102; i++ {
		cycle(i)
	}
	// Goroutines of finished work exit asynchronously (a sandbox's
	// netstack workers, HTTP keep-alives); give them a bounded while.
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := runtime.NumGoroutine(); got > goroutines {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines after 100 cycles, %d before:\n%s", got, goroutines, buf[:runtime.Stack(buf, true)])
	}
	if got := openFDs(t); got > fds {
		t.Errorf("%d descriptors open after 100 cycles, %d before", got, fds)
	}
	if got := r.router.Links(); len(got) != 0 {
		t.Errorf("router links %v left", got)
	}
	if got := r.ipam.List(); len(got) != 0 {
		t.Errorf("IPAM allocations %v left", got)
	}
	if ents, _ := os.ReadDir(r.cfg.SandboxDir); len(ents) != 0 {
		t.Errorf("%d files left in the sandbox dir", len(ents))
	}
	if ents, _ := os.ReadDir(filepath.Join(r.cfg.StateDir, attachmentsDir)); len(ents) != 0 {
		t.Errorf("%d records left", len(ents))
	}
	testutil.Do(t, podNS, func() error {
		if _, err := netlink.LinkByName("eth0"); err == nil {
			return fmt.Errorf("TAP device eth0 left in the pod netns")
		}
		return nil
	})
}

// TestSandboxProgram runs the sandbox workload program in a child process
// on a shm link, in echo mode, and echoes verified bytes from a tap pod.
func TestSandboxProgram(t *testing.T) {
	e := newEnv(t)
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: no go tool to build the sandbox program")
	}
	bin := filepath.Join(t.TempDir(), "sandbox")
	build := exec.Command(goTool, "build", "-o", bin, "../../test/e2e/sandbox")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the sandbox program: %v\n%s", err, out)
	}
	r := e.start(t)
	p := r.newTapPod(t, "pod-k", true)
	resp := r.attachShm(t, "sandbox-1")
	var sbAddr netip.Addr
	for _, ip := range resp.IPs {
		if a := netip.MustParsePrefix(ip.Address).Addr(); a.Is4() {
			sbAddr = a
		}
	}

	cmd := exec.Command(bin, "--socket", resp.SocketPath, "--mode", "echo", "--port", "7000")
	cmd.Stderr = testutil.LogWriter(t)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt) // the child we started, by its PID
		if err := <-exited; err != nil {
			t.Errorf("sandbox program: %v", err)
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("sandbox program printed %q, %v; want ready", line, err)
	}
	c, err := dialFrom(p.ns, netip.AddrPortFrom(sbAddr, 7000))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioTimeout))
	const n = 1 << 20
	errc := make(chan error, 1)
	go func() {
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = patternByte(int64(i))
		}
		_, err := c.Write(buf)
		errc <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read the echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("send: %v", err)
	}
	for i, b := range got {
		if b != patternByte(int64(i)) {
			t.Fatalf("echoed byte %d: got %#x, want %#x", i, b, patternByte(int64(i)))
		}
	}
}
