package cni

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// configCases are configs and what ParseConfig makes of them: the CNI code
// (0: accepted) and the fields the error must name. FuzzParseConfig is
// seeded from them.
var configCases = []struct {
	name string
	conf string
	code uint
	want []string // substrings of the error
}{
	{"minimal", `{"cniVersion":"1.1.0","name":"pods","type":"shm-cni"}`, 0, nil},
	{"full", `{"cniVersion":"1.1.0","name":"pods","type":"shm-cni","kind":"shm","mtu":9000,"agentSocket":"/run/x/agent.sock",
		"queue":{"dataSize":2097152,"pipeSize":131072,"bufferSize":4096},"logFile":"/var/log/shm-cni.log","logLevel":"debug",
		"ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24"}]]}}`, 0, nil},
	{"runtime keys ignored", `{"cniVersion":"1.1.0","name":"pods","type":"shm-cni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":"b"},"portMappings":[]},"cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}],"somethingElse":1}`, 0, nil},
	{"queue null keeps defaults", `{"name":"pods","queue":null}`, 0, nil},
	{"empty ipam: agent allocates", `{"name":"pods","ipam":{}}`, 0, nil},

	{"not json", `{"name":`, agentapi.CodeDecodingFailure, []string{"decode"}},
	{"not an object", `[1,2]`, agentapi.CodeDecodingFailure, []string{"decode"}},
	{"mtu wrong type", `{"name":"pods","mtu":"1500"}`, agentapi.CodeInvalidConfig, []string{"mtu"}},
	{"queue wrong type", `{"name":"pods","queue":{"dataSize":-1}}`, agentapi.CodeInvalidConfig, []string{"queue.dataSize"}},
	{"mtu too small", `{"name":"pods","mtu":67}`, agentapi.CodeInvalidConfig, []string{"mtu: 67"}},
	{"mtu too large", `{"name":"pods","mtu":65536}`, agentapi.CodeInvalidConfig, []string{"mtu: 65536"}},
	{"shmMtu largest", `{"name":"pods","shmMtu":65535}`, 0, nil},
	{"shmMtu below IPv6's minimum", `{"name":"pods","shmMtu":1279}`, agentapi.CodeInvalidConfig, []string{"shmMtu: 1279"}},
	{"shmMtu too large", `{"name":"pods","shmMtu":65536}`, agentapi.CodeInvalidConfig, []string{"shmMtu: 65536"}},
	{"shmMtu wrong type", `{"name":"pods","shmMtu":"9000"}`, agentapi.CodeInvalidConfig, []string{"shmMtu"}},
	{"shmMtu beyond the queue", `{"name":"pods","shmMtu":65000,"queue":{"dataSize":1048576,"pipeSize":131072,"bufferSize":512}}`, agentapi.CodeInvalidConfig,
		[]string{"shmMtu: MTU 65000 does not fit the queue", "at most 32754"}},
	{"unknown kind", `{"name":"pods","kind":"vhost"}`, agentapi.CodeInvalidConfig, []string{"kind:", `"vhost"`}},
	{"unknown queue key", `{"name":"pods","queue":{"dataSze":4096}}`, agentapi.CodeUnsupportedField, []string{"queue.dataSze"}},
	{"bad bufferSize", `{"name":"pods","queue":{"bufferSize":100}}`, agentapi.CodeInvalidConfig, []string{"queue.bufferSize"}},
	{"bad dataSize", `{"name":"pods","queue":{"dataSize":5000}}`, agentapi.CodeInvalidConfig, []string{"queue.dataSize"}},
	{"pipe too small", `{"name":"pods","queue":{"pipeSize":4096}}`, agentapi.CodeInvalidConfig, []string{"queue.pipeSize"}},
	{"relative agentSocket", `{"name":"pods","agentSocket":"agent.sock"}`, agentapi.CodeInvalidConfig, []string{"agentSocket"}},
	{"long agentSocket", `{"name":"pods","agentSocket":"/` + strings.Repeat("a", 120) + `"}`, agentapi.CodeInvalidConfig, []string{"agentSocket"}},
	{"bad logLevel", `{"name":"pods","logLevel":"verbose"}`, agentapi.CodeInvalidConfig, []string{"logLevel", `"verbose"`}},
	{"relative logFile", `{"name":"pods","logFile":"shm.log"}`, agentapi.CodeInvalidConfig, []string{"logFile"}},
	{"ipam without type", `{"name":"pods","ipam":{"subnet":"10.0.0.0/8"}}`, agentapi.CodeInvalidConfig, []string{"ipam.type"}},
	{"ipam type is a path", `{"name":"pods","ipam":{"type":"../host-local"}}`, agentapi.CodeInvalidConfig, []string{"ipam.type"}},
	{"no name", `{"cniVersion":"1.1.0"}`, agentapi.CodeInvalidConfig, []string{"name: required"}},
	{"every problem named", `{"name":"pods","kind":"x","mtu":1,"logLevel":"y","queue":{"bufferSize":7}}`, agentapi.CodeInvalidConfig,
		[]string{"kind:", "mtu:", "logLevel:", "queue.bufferSize:"}},
}

// TestParseConfig checks each config's code and that the error names the
// offending fields.
func TestParseConfig(t *testing.T) {
	for _, tc := range configCases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.conf))
			if tc.code == 0 {
				if err != nil {
					t.Fatalf("ParseConfig: %v", err)
				}
				if c.Validate() != nil {
					t.Fatalf("accepted config does not validate: %v", c.Validate())
				}
				return
			}
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("ParseConfig error = %v (%T), want a *types.Error", err, err)
			}
			if got, want := te.Code, tc.code; got != want {
				t.Errorf("code = %d, want %d (%v)", got, want, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

// TestParseConfigDefaults checks that absent keys keep their defaults,
// also inside a partial queue object.
func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte(`{"name":"pods","queue":{"bufferSize":4096}}`))
	if err != nil {
		t.Fatal(err)
	}
	def := queue.DefaultSizes()
	if got, want := c.Queue, (queue.Sizes{DataSize: def.DataSize, PipeSize: def.PipeSize, BufferSize: 4096}); got != want {
		t.Errorf("queue = %+v, want %+v", got, want)
	}
	if c.Kind != KindTap || c.MTU != 1500 || c.AgentSocket != "/run/shm-cni/agent.sock" || c.LogLevel != "info" || c.DelegatesIPAM() {
		t.Errorf("defaults not applied: %+v", c)
	}
}

// TestPodKind checks the per-pod kind overrides, their precedence and
// errors.
func TestPodKind(t *testing.T) {
	const base = `{"name":"pods"`
	for _, tc := range []struct {
		name    string
		conf    string
		cniArgs string
		want    string
		code    uint
		errHas  string
	}{
		{"default", base + `}`, "", KindTap, 0, ""},
		{"config kind", base + `,"kind":"shm"}`, "", KindShm, 0, ""},
		{"config kind veth", base + `,"kind":"veth"}`, "", KindVeth, 0, ""},
		{"cni args veth", base + `}`, "SHM_CNI_KIND=veth", KindVeth, 0, ""},
		{"cni args", base + `}`, "IgnoreUnknown=1;K8S_POD_NAME=p;SHM_CNI_KIND=shm", KindShm, 0, ""},
		{"cni args known keys only", base + `}`, "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;SHM_CNI_KIND=shm", KindShm, 0, ""},
		{"args.cni.kind", base + `,"args":{"cni":{"kind":"shm"}}}`, "", KindShm, 0, ""},
		{"annotation", base + `,"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"shm-cni.io/kind":"shm"}}}`, "", KindShm, 0, ""},
		{"cni args beat args and annotation", base + `,"kind":"shm","args":{"cni":{"kind":"shm"}},"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"shm-cni.io/kind":"shm"}}}`,
			"SHM_CNI_KIND=tap", KindTap, 0, ""},
		{"args beat annotation", base + `,"args":{"cni":{"kind":"tap"}},"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"shm-cni.io/kind":"shm"}}}`, "", KindTap, 0, ""},
		{"unknown cni args kind", base + `}`, "SHM_CNI_KIND=vhost", "", agentapi.CodeInvalidConfig, `SHM_CNI_KIND: unknown link kind "vhost"`},
		{"unknown args kind", base + `,"args":{"cni":{"kind":"vhost"}}}`, "", "", agentapi.CodeInvalidConfig, `args.cni.kind: unknown link kind "vhost"`},
		{"unknown annotation kind", base + `,"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"shm-cni.io/kind":"vhost"}}}`, "", "", agentapi.CodeInvalidConfig, `shm-cni.io/kind: unknown link kind "vhost"`},
		{"unknown cni arg", base + `}`, "FOO=bar", "", agentapi.CodeInvalidEnvironment, "CNI_ARGS"},
		{"malformed cni args", base + `}`, "SHM_CNI_KIND", "", agentapi.CodeInvalidEnvironment, "CNI_ARGS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.conf))
			if err != nil {
				t.Fatal(err)
			}
			a, err := ParsePodArgs(tc.cniArgs)
			var kind string
			if err == nil {
				kind, err = c.PodKind(a)
			}
			if got := codeOf(err); got != tc.code {
				t.Fatalf("code = %d (%v), want %d", got, err, tc.code)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tc.errHas) {
					t.Errorf("error %q does not contain %q", err, tc.errHas)
				}
				return
			}
			if kind != tc.want {
				t.Errorf("kind = %q, want %q", kind, tc.want)
			}
		})
	}
}

// TestPodBandwidth checks the bandwidth capability from runtimeConfig: the
// CNI conventions' object, the reference plugin's rules, every refusal
// code 7 naming its field; and that ParseConfig (which DEL runs) accepts
// what PodBandwidth (which ADD runs) refuses.
func TestPodBandwidth(t *testing.T) {
	const base = `{"name":"pods","runtimeConfig":{"bandwidth":`
	for _, tc := range []struct {
		name   string
		bw     string
		want   *linkspec.Bandwidth
		errHas []string
	}{
		{"none", `null`, nil, nil},
		{"empty", `{}`, nil, nil},
		{"conventions' example", `{"ingressRate":2048,"ingressBurst":1600,"egressRate":4096,"egressBurst":1600}`,
			&linkspec.Bandwidth{IngressRate: 2048, IngressBurst: 1600, EgressRate: 4096, EgressBurst: 1600}, nil},
		{"containerd's annotation", `{"ingressRate":10000000,"ingressBurst":4294967295}`,
			&linkspec.Bandwidth{IngressRate: 10_000_000, IngressBurst: 1<<32 - 1}, nil},
		{"CRI-O's annotation", `{"egressRate":10000000,"egressBurst":34359738359}`,
			&linkspec.Bandwidth{EgressRate: 10_000_000, EgressBurst: 34359738359}, nil},
		{"negative rate", `{"ingressRate":-1,"ingressBurst":1000}`, nil, []string{"runtimeConfig.bandwidth.ingressRate: got a JSON number -1, want a uint64"}},
		{"fractional burst", `{"egressRate":1000,"egressBurst":1.5}`, nil, []string{"runtimeConfig.bandwidth.egressBurst: got a JSON number 1.5"}},
		{"rate as string", `{"egressRate":"10M","egressBurst":1000}`, nil, []string{"runtimeConfig.bandwidth.egressRate: got a JSON string"}},
		{"not an object", `[1]`, nil, []string{"runtimeConfig.bandwidth"}},
		{"rate without burst", `{"ingressRate":1000000}`, nil, []string{"runtimeConfig.bandwidth.ingressBurst: required when ingressRate is set"}},
		{"burst without rate", `{"egressBurst":1000000}`, nil, []string{"runtimeConfig.bandwidth.egressRate: required when egressBurst is set"}},
		{"burst over 4 GB", `{"ingressRate":1000000,"ingressBurst":34359738360}`, nil, []string{"runtimeConfig.bandwidth.ingressBurst: 34359738360 bits is more than"}},
		{"rate over 1 Pbit/s", `{"egressRate":1000000000000001,"egressBurst":1000}`, nil, []string{"runtimeConfig.bandwidth.egressRate: 1000000000000001 bit/s is not in"}},
		{"two problems", `{"ingressRate":1,"egressBurst":8}`, nil, []string{"ingressRate: 1 bit/s", "ingressBurst: required", "egressRate: required"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(base + tc.bw + `}}`))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			got, err := c.PodBandwidth()
			if len(tc.errHas) > 0 {
				if code := codeOf(err); code != agentapi.CodeInvalidConfig {
					t.Fatalf("PodBandwidth() = %v, %v; want code %d", got, err, agentapi.CodeInvalidConfig)
				}
				for _, s := range tc.errHas {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not contain %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("PodBandwidth: %v", err)
			}
			if (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
				t.Errorf("PodBandwidth() = %v, want %v", got, tc.want)
			}
		})
	}
}
