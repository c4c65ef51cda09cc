package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/shm-cni/shm-cni/internal/untrusted"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// Link kinds, the values of Config.Kind and of the per-pod overrides.
const (
	// KindTap gives the pod a TAP device (kernel-stack pods). The default.
	KindTap = agentapi.KindTap
	// KindShm gives the pod a shared-memory queue pair for a sandbox's
	// userspace stack, and a placeholder dummy interface in its netns.
	KindShm = agentapi.KindShm
	// KindVeth gives a kernel-stack pod a veth pair whose host side the
	// host's kernel routes (linkspec.HostVethName), as the ptp plugin's:
	// its traffic to kernel pods of the same kind, the host and the world
	// does not cross the agent. Not where the agent enforces
	// NetworkPolicy or a bandwidth limit (it refuses the attach).
	KindVeth = agentapi.KindVeth
)

// AttachSocketAliasPrefix starts the interface alias of a shm link's
// placeholder, followed by the link's attach socket (the result's
// socketPath), so that a runtime reading the pod netns finds the socket:
// runsc --sharedmem-links (with the patches in hack/runsc) dials it.
const AttachSocketAliasPrefix = "sharedmem:"

// Defaults of the Config fields.
const (
	DefaultKind     = KindTap
	DefaultMTU      = 1500
	DefaultLogLevel = "info"
)

// Per-pod overrides of the link kind.
const (
	// ArgKind is the CNI_ARGS key ("SHM_CNI_KIND=shm").
	ArgKind = "SHM_CNI_KIND"
	// AnnotationKind is the pod annotation, read from the runtimeConfig
	// key PodAnnotationsKey when the runtime passes pod annotations.
	AnnotationKind = "shm-cni.io/kind"
	// PodAnnotationsKey is the runtimeConfig key under which CRI runtimes
	// pass the pod's annotations.
	PodAnnotationsKey = "io.kubernetes.cri.pod-annotations"
)

// maxSocketPath is the longest unix socket path: sun_path is 108 bytes
// including the terminating NUL.
const maxSocketPath = 107

// Config is one shm-cni plugin entry of a conflist ("type": "shm-cni").
// Fields absent from the JSON keep their defaults (see ParseConfig).
//
// Config embeds types.PluginConf, whose MarshalJSON method is promoted:
// json.Marshal of a Config encodes only the PluginConf part. Config is meant
// to be parsed, not encoded.
type Config struct {
	types.PluginConf

	// Kind is the default link kind, KindTap, KindShm or KindVeth. Pods may
	// override it (see Config.PodKind).
	Kind string `json:"kind,omitempty"`
	// MTU is the IP MTU of a kernel-stack pod's link (kind tap or veth),
	// 68..65535, unless the agent answers with another.
	MTU int `json:"mtu,omitempty"`
	// ShmMTU is the IP MTU of a sandbox's link (kind shm), 1280..65535
	// and at most what the queue's sizes carry (queue.Sizes.MaxMTU); 0,
	// the default, lets the agent choose (its --shm-mtu, bounded by the
	// queue). A sandbox's userspace stack sends TCP segments of up to
	// the MTU over its queue pair; the router carries them whole to other
	// sandbox links and cuts or refuses them (ICMP) where a link's MTU is
	// smaller.
	ShmMTU int `json:"shmMtu,omitempty"`
	// AgentSocket is the agent's unix socket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// Queue are the queue sizes of a shm link; keys left out keep
	// queue.DefaultSizes. Used only for kind shm.
	Queue queue.Sizes `json:"queue"`
	// LogFile, when set, receives the plugin's logs (appended) instead of
	// stderr. It must be an absolute path.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `json:"logLevel,omitempty"`

	// Args are the conventional "args" of the config (CNI conventions):
	// args.cni.kind overrides Kind for this pod.
	Args *ConfigArgs `json:"args,omitempty"`
	// RuntimeConfig carries what the runtime passes per pod.
	RuntimeConfig *RuntimeConfig `json:"runtimeConfig,omitempty"`
}

// ConfigArgs is the config's "args" object.
type ConfigArgs struct {
	CNI *struct {
		Kind string `json:"kind,omitempty"`
	} `json:"cni,omitempty"`
}

// RuntimeConfig is the config's "runtimeConfig" object, as far as shm-cni
// reads it.
type RuntimeConfig struct {
	// PodAnnotations are the pod's annotations, when the runtime passes
	// them (CRI-O does).
	PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	// Bandwidth is the CNI "bandwidth" capability (a linkspec.Bandwidth),
	// passed when the conflist entry declares it; Kubernetes runtimes fill
	// it from the pod annotations kubernetes.io/ingress-bandwidth and
	// kubernetes.io/egress-bandwidth. Kept raw and read by
	// Config.PodBandwidth on ADD alone, as the pod's kind, so that a
	// value ADD refused never stops the pod's DEL.
	Bandwidth json.RawMessage `json:"bandwidth,omitempty"`
}

// BandwidthCapability is the capability (and runtimeConfig key) of the
// per-pod bandwidth limit.
const BandwidthCapability = "bandwidth"

// PodBandwidth returns the pod's bandwidth limit from runtimeConfig, or
// nil when there is none or it limits nothing. A value of the wrong JSON
// type (a negative or fractional rate, say) or one linkspec.Bandwidth's
// Validate refuses is a *types.Error with agentapi.CodeInvalidConfig
// naming the field ("runtimeConfig.bandwidth.ingressBurst: ...").
func (c *Config) PodBandwidth() (*linkspec.Bandwidth, error) {
	const field = "runtimeConfig." + BandwidthCapability
	if c.RuntimeConfig == nil || len(c.RuntimeConfig.Bandwidth) == 0 || bytes.Equal(c.RuntimeConfig.Bandwidth, []byte("null")) {
		return nil, nil
	}
	var bw linkspec.Bandwidth
	if err := json.Unmarshal(c.RuntimeConfig.Bandwidth, &bw); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return nil, newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: %s.%s: got a JSON %s, want a %s", field, te.Field, te.Value, te.Type)
		}
		return nil, newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: %s: %v", field, err)
	}
	if err := bw.Validate(); err != nil {
		var details []string
		for _, e := range unjoin(err) {
			details = append(details, field+"."+e.Error())
		}
		return nil, types.NewError(agentapi.CodeInvalidConfig, "invalid shm-cni config", strings.Join(details, "; "))
	}
	if bw.IsZero() {
		return nil, nil
	}
	return &bw, nil
}

// DefaultConfig returns a Config holding every default.
func DefaultConfig() Config {
	return Config{
		Kind:        DefaultKind,
		MTU:         DefaultMTU,
		AgentSocket: agentapi.DefaultSocketPath,
		Queue:       queue.DefaultSizes(),
		LogLevel:    DefaultLogLevel,
	}
}

// ParseConfig parses a plugin config (the CNI command's stdin) over
// DefaultConfig and validates it. Keys outside shm-cni's own objects are
// ignored, since runtimes add their own; inside "queue" an unknown key is
// refused. Every error is a *types.Error:
//   - agentapi.CodeDecodingFailure when data is not one JSON object;
//   - agentapi.CodeUnsupportedField for an unknown key in "queue";
//   - agentapi.CodeInvalidConfig for a value of the wrong JSON type or one Validate
//     refuses, naming the field.
func ParseConfig(data []byte) (*Config, error) {
	c := DefaultConfig()
	if err := json.Unmarshal(data, &c); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return nil, newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: %s: got a JSON %s, want %s", te.Field, te.Value, te.Type)
		}
		return nil, newError(agentapi.CodeDecodingFailure, "cannot decode shm-cni config: %v", err)
	}
	if err := checkObjects(data); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, types.NewError(agentapi.CodeInvalidConfig, "invalid shm-cni config", joinDetails(err))
	}
	return &c, nil
}

// checkObjects refuses unknown keys inside "queue" and an "ipam" object with
// keys but no "type". data decoded once already.
func checkObjects(data []byte) error {
	var probe struct {
		Queue json.RawMessage            `json:"queue"`
		IPAM  map[string]json.RawMessage `json:"ipam"`
	}
	if err := json.Unmarshal(data, &probe); err != nil {
		return newError(agentapi.CodeDecodingFailure, "cannot decode shm-cni config: %v", err)
	}
	if len(probe.Queue) > 0 && !bytes.Equal(probe.Queue, []byte("null")) {
		dec := json.NewDecoder(bytes.NewReader(probe.Queue))
		dec.DisallowUnknownFields()
		var s queue.Sizes
		if err := dec.Decode(&s); err != nil {
			if key, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
				return newError(agentapi.CodeUnsupportedField, "unsupported field in shm-cni config: queue.%s (known: dataSize, pipeSize, bufferSize)", strings.Trim(key, `"`))
			}
			return newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: queue: %v", err)
		}
	}
	if len(probe.IPAM) > 0 {
		if _, ok := probe.IPAM["type"]; !ok {
			return newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: ipam.type: required when ipam has other keys (leave ipam out to let the agent allocate)")
		}
	}
	return nil
}

// Validate reports every problem of c at once (errors.Join), each naming
// its field, for example "queue.bufferSize: ...".
func (c *Config) Validate() error {
	var errs []error
	add := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.Name == "" {
		add("name", "required")
	}
	if err := validKind(c.Kind); err != nil {
		add("kind", "%v", err)
	}
	if err := linkspec.CheckMTU(c.MTU, linkspec.MinMTU); err != nil {
		add("mtu", "%v", err)
	}
	if err := linkspec.CheckMTU(c.ShmMTU, linkspec.MinShmMTU); c.ShmMTU != 0 && err != nil {
		add("shmMtu", "%v (or 0, the agent's choice)", err)
	} else if c.ShmMTU != 0 && c.Queue.Validate() == nil {
		if err := c.Queue.CheckMTU(uint32(c.ShmMTU)); err != nil {
			add("shmMtu", "%v (queue.bufferSize, queue.dataSize)", err)
		}
	}
	switch {
	case c.AgentSocket == "":
		add("agentSocket", "required")
	case !filepath.IsAbs(c.AgentSocket) || strings.ContainsRune(c.AgentSocket, 0):
		add("agentSocket", "%s is not an absolute path", untrusted.Quote(c.AgentSocket))
	case len(c.AgentSocket) > maxSocketPath:
		add("agentSocket", "%d bytes, longer than a unix socket path may be (%d)", len(c.AgentSocket), maxSocketPath)
	}
	if err := c.Queue.Validate(); err != nil {
		for _, e := range unjoin(err) {
			errs = append(errs, fmt.Errorf("queue.%w", e))
		}
	}
	if c.LogFile != "" && (!filepath.IsAbs(c.LogFile) || strings.ContainsRune(c.LogFile, 0)) {
		add("logFile", "%s is not an absolute path", untrusted.Quote(c.LogFile))
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		add("logLevel", "%v", err)
	}
	if c.IPAM.Type != "" && (strings.ContainsAny(c.IPAM.Type, `/\`) || c.IPAM.Type == "." || c.IPAM.Type == "..") {
		add("ipam.type", "%s is not a plugin name", untrusted.Quote(c.IPAM.Type))
	}
	return errors.Join(errs...)
}

// linkMTU is the MTU an attach of kind asks the agent for: mtu for a tap
// link, shmMtu (0: the agent's choice) for a shm link.
func (c *Config) linkMTU(kind string) int {
	if kind == KindShm {
		return c.ShmMTU
	}
	return c.MTU
}

// tapGSOMaxSize is the gso_max_size of a kernel pod's TAP device: the
// largest TCP super-packet its kernel builds fits a sandbox link whole (the
// conflist's shmMtu, else the agent's default), so that the router hands it
// to a sandbox as it is instead of cutting it in two (splitSuper in package
// router; through gVisor's forwarding, before the router cut it on its fast
// path, it cost 31% more CPU per GiB). A veth pod keeps the kernel's size,
// under which a BBR sender moves more; a TAP pod's streams are bound by the
// agent's CPU, and with the kernel's size they moved no more
// (docs/speed.md). Below 16 KiB a super-packet is cut anyway: 0 leaves the
// kernel's default.
func (c *Config) tapGSOMaxSize() int {
	mtu := c.ShmMTU
	if mtu == 0 {
		mtu = linkspec.DefaultShmMTU
	}
	if mtu < 16<<10 {
		return 0
	}
	return mtu
}

// DelegatesIPAM reports whether the config names an IPAM plugin; otherwise
// the agent allocates the addresses.
func (c *Config) DelegatesIPAM() bool { return c.IPAM.Type != "" }

// PodArgs are what the runtime says about the pod in CNI_ARGS. The field
// names are the CNI_ARGS keys, as types.LoadArgs requires.
type PodArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
	SHM_CNI_KIND               types.UnmarshallableString
}

// ParsePodArgs parses CNI_ARGS ("K=V;K2=V2"). Unknown keys are refused
// unless IgnoreUnknown is set, as the CNI conventions say; errors are
// *types.Error with agentapi.CodeInvalidEnvironment naming CNI_ARGS.
func ParsePodArgs(cniArgs string) (*PodArgs, error) {
	var a PodArgs
	if err := types.LoadArgs(cniArgs, &a); err != nil {
		return nil, newError(agentapi.CodeInvalidEnvironment, "invalid CNI_ARGS: %v", err)
	}
	return &a, nil
}

// PodKind returns the link kind for one pod: the first of CNI_ARGS
// SHM_CNI_KIND, the config's args.cni.kind, the pod annotation
// shm-cni.io/kind (runtimeConfig io.kubernetes.cri.pod-annotations) that is
// set, else c.Kind. An unknown kind is a *types.Error with
// agentapi.CodeInvalidConfig naming its source and value.
func (c *Config) PodKind(a *PodArgs) (string, error) {
	type source struct{ name, value string }
	var srcs []source
	if a != nil {
		srcs = append(srcs, source{"CNI_ARGS " + ArgKind, string(a.SHM_CNI_KIND)})
	}
	if c.Args != nil && c.Args.CNI != nil {
		srcs = append(srcs, source{"args.cni.kind", c.Args.CNI.Kind})
	}
	if c.RuntimeConfig != nil {
		srcs = append(srcs, source{"runtimeConfig pod annotation " + AnnotationKind, c.RuntimeConfig.PodAnnotations[AnnotationKind]})
	}
	srcs = append(srcs, source{"kind", c.Kind})
	for _, s := range srcs {
		if s.value == "" {
			continue
		}
		if err := validKind(s.value); err != nil {
			return "", newError(agentapi.CodeInvalidConfig, "invalid shm-cni config: %s: %v", s.name, err)
		}
		return s.value, nil
	}
	return DefaultKind, nil
}

func validKind(k string) error {
	switch k {
	case KindTap, KindShm, KindVeth:
		return nil
	}
	return fmt.Errorf("unknown link kind %s (want %s, %s or %s)", untrusted.Quote(k), KindTap, KindShm, KindVeth)
}

// parseLevel parses a logLevel value.
func parseLevel(s string) (slog.Level, error) {
	switch s {
	case "debug":
		return slog.LevelDebug, nil
	case "info", "":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%s is not one of debug, info, warn, error", untrusted.Quote(s))
}

// unjoin returns the errors an errors.Join joined, or err alone.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// joinDetails renders a joined error on one line, problems separated by
// "; ".
func joinDetails(err error) string {
	var parts []string
	for _, e := range unjoin(err) {
		parts = append(parts, e.Error())
	}
	return strings.Join(parts, "; ")
}
