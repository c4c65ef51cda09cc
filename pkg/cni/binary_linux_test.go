package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// TestBinaryThroughLibcni drives the built shm-cni binary the way container
// runtimes do, through libcni with a 1.1.0 conflist: STATUS, ADD, CHECK,
// GC, DEL, DEL, for both kinds.
func TestBinaryThroughLibcni(t *testing.T) {
	testutil.RequireRoot(t)
	dir := shmCNI(t)
	agent := startFakeAgent(t)
	confDir := t.TempDir()
	conflist := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"testnet","plugins":[{"type":"shm-cni","agentSocket":%s,"mtu":1450,"logLevel":"debug","logFile":%s}]}`,
		jsonString(agent.path), jsonString(filepath.Join(confDir, "shm-cni.log")))
	path := filepath.Join(confDir, "10-shm.conflist")
	if err := os.WriteFile(path, []byte(conflist), 0o600); err != nil {
		t.Fatal(err)
	}
	list, err := libcni.NetworkConfFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{dir}, t.TempDir(), nil)
	ctx := context.Background()

	if err := cni.GetStatusNetworkList(ctx, list); err != nil {
		t.Fatalf("STATUS: %v", err)
	}
	for _, kind := range []string{KindTap, KindShm} {
		t.Run(kind, func(t *testing.T) {
			netns := testutil.NewNS(t)
			rt := &libcni.RuntimeConf{
				ContainerID: "libcni-" + kind,
				NetNS:       netns.Path(),
				IfName:      "eth0",
				Args:        [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAME", "p"}, {ArgKind, kind}},
			}
			res, err := cni.AddNetworkList(ctx, list, rt)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			r, err := types100.GetResult(res)
			if err != nil {
				t.Fatal(err)
			}
			at, ok := agent.attachment(rt.ContainerID, "eth0")
			if !ok || at.req.Kind != kind {
				t.Fatalf("agent attachment %+v %t, want kind %s", at.req, ok, kind)
			}
			wantResult(t, r, netns, at, 1450)
			if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
				t.Fatalf("CHECK: %v", err)
			}
			// GC with this attachment valid keeps it.
			if err := cni.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: rt.ContainerID, IfName: "eth0"}}}); err != nil {
				t.Fatalf("GC: %v", err)
			}
			if _, ok := agent.attachment(rt.ContainerID, "eth0"); !ok {
				t.Fatal("GC released a valid attachment")
			}
			for i := range 2 {
				if err := cni.DelNetworkList(ctx, list, rt); err != nil {
					t.Fatalf("DEL #%d: %v", i+1, err)
				}
			}
			if _, ok := readPodLink(t, netns, "eth0"); ok || agent.count() != 0 {
				t.Errorf("after DEL: eth0 present %t, agent attachments %d", ok, agent.count())
			}
		})
	}
	log, err := os.ReadFile(filepath.Join(confDir, "shm-cni.log"))
	if err != nil || !bytes.Contains(log, []byte("containerID=libcni-tap")) || !bytes.Contains(log, []byte("level=DEBUG")) {
		t.Errorf("logFile: %v\n%s", err, log)
	}
}

// TestBinaryErrors runs the built binary with bad configs and bad CNI
// environments and checks the exit status, the error code in the JSON on
// stdout, and that the message names the field or variable.
func TestBinaryErrors(t *testing.T) {
	testutil.RequireRoot(t)
	dir := shmCNI(t)
	bin := filepath.Join(dir, "shm-cni")
	agent := startFakeAgent(t)
	netns := testutil.NewNS(t)
	conf := func(extra string) string {
		return `{"cniVersion":"1.1.0","name":"testnet","type":"shm-cni","agentSocket":` + jsonString(agent.path) + extra + `}`
	}
	down := filepath.Join(t.TempDir(), "none.sock")
	good := map[string]string{
		"CNI_COMMAND":     "ADD",
		"CNI_CONTAINERID": "bad-env",
		"CNI_NETNS":       netns.Path(),
		"CNI_IFNAME":      "eth0",
		"CNI_PATH":        dir,
	}
	for _, tc := range []struct {
		name  string
		env   map[string]string // overrides of good; "" unsets
		stdin string
		code  uint
		names string // the message must contain this
	}{
		{"no CNI_NETNS for ADD", map[string]string{"CNI_NETNS": ""}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_NETNS"},
		{"no CNI_PATH", map[string]string{"CNI_PATH": ""}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_PATH"},
		{"no CNI_CONTAINERID", map[string]string{"CNI_CONTAINERID": ""}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_CONTAINERID"},
		{"bad CNI_IFNAME", map[string]string{"CNI_IFNAME": "a/b"}, conf(""), agentapi.CodeInvalidEnvironment, "interface name"},
		{"unknown CNI_COMMAND", map[string]string{"CNI_COMMAND": "FROB"}, conf(""), agentapi.CodeInvalidEnvironment, "FROB"},
		{"CNI_NETNS not a netns", map[string]string{"CNI_NETNS": "/proc/self/status"}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_NETNS"},
		{"CNI_NETNS missing", map[string]string{"CNI_NETNS": "/run/netns/shm-cni-no-such-netns"}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_NETNS"},
		{"CNI_NETNS is the plugin's", map[string]string{"CNI_NETNS": fmt.Sprintf("/proc/%d/ns/net", os.Getpid())}, conf(""), agentapi.CodeInvalidNetNS, "CNI_NETNS"},
		{"malformed CNI_ARGS", map[string]string{"CNI_ARGS": "SHM_CNI_KIND"}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_ARGS"},
		{"unknown CNI_ARGS key", map[string]string{"CNI_ARGS": "FOO=bar"}, conf(""), agentapi.CodeInvalidEnvironment, "CNI_ARGS"},
		{"unknown kind in CNI_ARGS", map[string]string{"CNI_ARGS": "IgnoreUnknown=1;SHM_CNI_KIND=vhost"}, conf(""), agentapi.CodeInvalidConfig, `"vhost"`},
		{"not JSON", nil, `{"name":"testnet",`, agentapi.CodeDecodingFailure, "unmarshal"},
		{"old cniVersion", nil, `{"cniVersion":"0.3.1","name":"testnet","type":"shm-cni"}`, agentapi.CodeIncompatibleVersion, "incompatible"},
		{"STATUS with a 1.0.0 config", map[string]string{"CNI_COMMAND": "STATUS"}, `{"cniVersion":"1.0.0","name":"testnet","type":"shm-cni"}`, agentapi.CodeIncompatibleVersion, "STATUS"},
		{"no name", nil, `{"cniVersion":"1.1.0","type":"shm-cni"}`, agentapi.CodeInvalidConfig, "name"},
		{"unknown kind", nil, conf(`,"kind":"vhost"`), agentapi.CodeInvalidConfig, `kind: unknown link kind "vhost"`},
		{"bad mtu", nil, conf(`,"mtu":20`), agentapi.CodeInvalidConfig, "mtu: 20"},
		{"mtu not a number", nil, conf(`,"mtu":"big"`), agentapi.CodeInvalidConfig, "mtu"},
		{"unknown queue key", nil, conf(`,"queue":{"bufsize":1}`), agentapi.CodeUnsupportedField, "queue.bufsize"},
		{"bad bufferSize", nil, conf(`,"queue":{"bufferSize":7}`), agentapi.CodeInvalidConfig, "queue.bufferSize"},
		{"relative agentSocket", nil, `{"cniVersion":"1.1.0","name":"testnet","agentSocket":"a.sock"}`, agentapi.CodeInvalidConfig, "agentSocket"},
		{"ADD with the agent down", nil, `{"cniVersion":"1.1.0","name":"testnet","agentSocket":` + jsonString(down) + `}`, agentapi.CodeTryAgainLater, "not running"},
		{"STATUS with the agent down", map[string]string{"CNI_COMMAND": "STATUS"}, `{"cniVersion":"1.1.0","name":"testnet","agentSocket":` + jsonString(down) + `}`, agentapi.CodeNotAvailable, "not available"},
		{"IPAM plugin missing", nil, conf(`,"ipam":{"type":"no-such-ipam"}`), agentapi.CodeInternal, "no-such-ipam"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := []string{"PATH=" + os.Getenv("PATH")}
			for k, v := range good {
				if o, ok := tc.env[k]; ok {
					v = o
				}
				if v != "" {
					env = append(env, k+"="+v)
				}
			}
			for k, v := range tc.env {
				if _, ok := good[k]; !ok && v != "" {
					env = append(env, k+"="+v)
				}
			}
			cmd := exec.Command(bin)
			cmd.Env = env
			cmd.Stdin = strings.NewReader(tc.stdin)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if _, ok := err.(*exec.ExitError); !ok {
				t.Fatalf("run: %v, want exit status 1; stdout %q", err, stdout.String())
			}
			var e types.Error
			if err := json.Unmarshal(stdout.Bytes(), &e); err != nil {
				t.Fatalf("stdout %q is not a CNI error: %v", stdout.String(), err)
			}
			if e.Code != tc.code {
				t.Errorf("code = %d (%s), want %d", e.Code, e.Error(), tc.code)
			}
			if !strings.Contains(e.Error(), tc.names) {
				t.Errorf("error %q does not name %q", e.Error(), tc.names)
			}
			if names := linkNames(t, netns); len(names) != 1 {
				t.Errorf("failed ADD left interfaces %v", names)
			}
		})
	}
	if n := agent.opCount("attach"); n != 0 {
		t.Errorf("the agent got %d attach requests from failed commands", n)
	}
}

// TestBinaryVersion checks VERSION: the library's answer, listing 1.1.0.
func TestBinaryVersion(t *testing.T) {
	bin := filepath.Join(shmCNI(t), "shm-cni")
	cmd := exec.Command(bin)
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("VERSION: %v", err)
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("VERSION output %q: %v", out, err)
	}
	if got, want := strings.Join(v.SupportedVersions, ","), "1.0.0,1.1.0"; got != want {
		t.Errorf("supportedVersions = %s, want %s", got, want)
	}
}
