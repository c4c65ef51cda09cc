package kind

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	kindv1alpha4 "sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/yaml"

	"github.com/shm-cni/shm-cni/pkg/agent"
)

// root is the repository root, from this package's directory.
const root = "../../.."

// decodeManifests is decodeFile failing t on error.
func decodeManifests(t *testing.T, file string) []runtime.Object {
	t.Helper()
	objs, err := decodeFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// decodeFile strictly decodes every document of a YAML file into the API
// types client-go's scheme knows: an unknown kind, an unknown or duplicate
// field, or a value of the wrong type fails.
func decodeFile(file string) ([]runtime.Object, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	s := json.NewSerializerWithOptions(json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
		json.SerializerOptions{Yaml: true, Strict: true})
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var objs []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", file, i, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := s.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: document %d (%v): %w", file, i, gvk, err)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

// stripComments drops comment lines.
func stripComments(doc []byte) []byte {
	var out bytes.Buffer
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out.Write(l)
			out.WriteByte('\n')
		}
	}
	return out.Bytes()
}

// deployment is deploy/shm-cni.yaml, one object of each kind.
type deployment struct {
	ns      *corev1.Namespace
	sa      *corev1.ServiceAccount
	role    *rbacv1.ClusterRole
	binding *rbacv1.ClusterRoleBinding
	cm      *corev1.ConfigMap
	ds      *appsv1.DaemonSet
}

func loadDeployment(t *testing.T) deployment {
	t.Helper()
	var d deployment
	count := map[string]int{}
	for _, o := range decodeManifests(t, filepath.Join(root, "deploy", "shm-cni.yaml")) {
		switch o := o.(type) {
		case *corev1.Namespace:
			d.ns = o
			count["Namespace"]++
		case *corev1.ServiceAccount:
			d.sa = o
			count["ServiceAccount"]++
		case *rbacv1.ClusterRole:
			d.role = o
			count["ClusterRole"]++
		case *rbacv1.ClusterRoleBinding:
			d.binding = o
			count["ClusterRoleBinding"]++
		case *corev1.ConfigMap:
			d.cm = o
			count["ConfigMap"]++
		case *appsv1.DaemonSet:
			d.ds = o
			count["DaemonSet"]++
		default:
			t.Errorf("unexpected object %T in deploy/shm-cni.yaml", o)
		}
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} {
		if count[k] != 1 {
			t.Fatalf("deploy/shm-cni.yaml has %d %s, want 1", count[k], k)
		}
	}
	return d
}

// TestDeployManifestsDecode: every file in deploy/ decodes strictly into
// the real API types.
func TestDeployManifestsDecode(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(root, "deploy", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/ (%v)", err)
	}
	for _, f := range files {
		if objs := decodeManifests(t, f); len(objs) == 0 {
			t.Errorf("%s: no object", f)
		}
	}
}

// TestStrictDecodingRejects: the decoder the tests rely on refuses an
// unknown field and a misspelled kind (so a typo in deploy/ fails them).
func TestStrictDecodingRejects(t *testing.T) {
	dir := t.TempDir()
	for name, doc := range map[string]string{
		"unknown field": "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\nautomountToken: true\n",
		"unknown kind":  "apiVersion: apps/v1\nkind: DaemonSett\nmetadata:\n  name: x\n",
		"wrong type":    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: [1]\n",
	} {
		f := filepath.Join(dir, "bad.yaml")
		if err := os.WriteFile(f, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := decodeFile(f); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

// TestDeployRBAC: the agent's service account may get, list and watch
// nodes, list and watch pods, namespaces and network policies (the
// informers NetworkPolicy needs), and nothing else.
func TestDeployRBAC(t *testing.T) {
	d := loadDeployment(t)
	got := map[string][]string{} // "group/resource": sorted verbs
	for _, r := range d.role.Rules {
		if len(r.ResourceNames) != 0 || len(r.NonResourceURLs) != 0 {
			t.Errorf("ClusterRole rule %+v: resource names or URLs", r)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				k := g + "/" + res
				got[k] = slices.Sorted(slices.Values(append(got[k], r.Verbs...)))
			}
		}
	}
	want := map[string][]string{
		"/nodes":                            {"get", "list", "watch"},
		"/pods":                             {"list", "watch"},
		"/namespaces":                       {"list", "watch"},
		"networking.k8s.io/networkpolicies": {"list", "watch"},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("ClusterRole grants %v, want %v", got, want)
	}
	b := d.binding
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != d.role.Name || b.RoleRef.APIGroup != rbacv1.GroupName {
		t.Errorf("binding roleRef %+v, want ClusterRole %s", b.RoleRef, d.role.Name)
	}
	if len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != d.sa.Name || b.Subjects[0].Namespace != d.ns.Name {
		t.Errorf("binding subjects %+v, want service account %s/%s", b.Subjects, d.ns.Name, d.sa.Name)
	}
	for _, m := range []struct{ kind, ns string }{{"ServiceAccount", d.sa.Namespace}, {"ConfigMap", d.cm.Namespace}, {"DaemonSet", d.ds.Namespace}} {
		if m.ns != d.ns.Name {
			t.Errorf("%s in namespace %q, want %q", m.kind, m.ns, d.ns.Name)
		}
	}
	if d.ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace labels %v: a privileged agent needs pod-security enforce=privileged", d.ns.Labels)
	}
}

// agentConfig parses the agent container's args with the agent's own flag
// set, after expanding $(VAR) references as the kubelet does: a downward
// API field to a placeholder, a ConfigMap key to its value in cm.
func agentConfig(t *testing.T, c corev1.Container, cm *corev1.ConfigMap) agent.Config {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			env[e.Name] = "field-" + e.ValueFrom.FieldRef.FieldPath
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			v, ok := cm.Data[ref.Key]
			if ref.Name != cm.Name || !ok {
				t.Fatalf("env %s: ConfigMap %s key %s not in the manifest", e.Name, ref.Name, ref.Key)
			}
			env[e.Name] = v
		default:
			t.Fatalf("env %s: unsupported source", e.Name)
		}
	}
	ref := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	args := make([]string, len(c.Args))
	for i, a := range c.Args {
		args[i] = ref.ReplaceAllStringFunc(a, func(m string) string {
			v, ok := env[m[2:len(m)-1]]
			if !ok {
				t.Errorf("arg %q refers to an undefined variable %s", a, m)
			}
			return v
		})
	}
	cfg := agent.DefaultConfig()
	fs := flag.NewFlagSet("shm-agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("the agent's flags refuse the DaemonSet's args %q: %v", args, err)
	}
	if fs.NArg() != 0 {
		t.Errorf("stray arguments %q", fs.Args())
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("the agent refuses the DaemonSet's configuration: %v", err)
	}
	return cfg
}

// TestDeployDaemonSet: the DaemonSet runs the agent as the design says
// (privileged, host network, every node, node-critical, rolling one node at
// a time, the local image), its args are flags the agent accepts, its
// probes reach the agent's health endpoints where the agent serves them,
// and the agent's paths are the host's through the mounts.
func TestDeployDaemonSet(t *testing.T) {
	d := loadDeployment(t)
	ds := d.ds
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("hostNetwork is not set")
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	if spec.ServiceAccountName != d.sa.Name {
		t.Errorf("serviceAccountName %q, want %q", spec.ServiceAccountName, d.sa.Name)
	}
	tolerateAll := slices.ContainsFunc(spec.Tolerations, func(t corev1.Toleration) bool {
		return t.Key == "" && t.Operator == corev1.TolerationOpExists && t.Effect == ""
	})
	if !tolerateAll {
		t.Errorf("tolerations %+v: want one tolerating every taint (not-ready nodes, control planes)", spec.Tolerations)
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.String() != "1" {
		t.Errorf("update strategy %+v, want RollingUpdate with maxUnavailable 1", u)
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels %v", k, v, ds.Spec.Template.Labels)
		}
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("the agent container is not privileged")
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy %q, want IfNotPresent (the image is loaded, not pulled)", c.ImagePullPolicy)
	}
	if want := makeVar(t, "IMAGE_TAG"); c.Image != want {
		t.Errorf("image %q, want %q, the tag make image writes", c.Image, want)
	}
	if len(c.Command) != 0 {
		t.Errorf("command %q overrides the image's entrypoint", c.Command)
	}
	if e := findEnv(c, "NODE_NAME"); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME %+v, want the downward API's spec.nodeName", e)
	}

	cfg := agentConfig(t, c, d.cm)
	if cfg.NodeName != "field-spec.nodeName" {
		t.Errorf("--node-name is %q, want $(NODE_NAME)", cfg.NodeName)
	}
	if len(cfg.PodCIDRs) != 0 {
		t.Errorf("--pod-cidr %v given: the pod CIDRs come from the Node", cfg.PodCIDRs)
	}
	if len(cfg.ClusterCIDRs) == 0 {
		t.Error("no --cluster-cidr: pod to pod traffic across nodes would be masqueraded")
	}
	// The Service CIDR is a cluster CIDR too (never masqueraded).
	if len(cfg.ServiceCIDRs) == 0 {
		t.Error("no --service-cidr: a pod's egress policy would judge Service addresses the host translates later")
	}
	for _, p := range cfg.ServiceCIDRs {
		if !slices.ContainsFunc(cfg.ClusterCIDRs, func(c netip.Prefix) bool { return c.Bits() <= p.Bits() && c.Contains(p.Addr()) }) {
			t.Errorf("--service-cidr %s is in no --cluster-cidr %v", p, cfg.ClusterCIDRs)
		}
	}

	// Probes: the agent's paths, on the host and port it listens on.
	host, port, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil {
		t.Fatalf("--metrics-addr %q: %v", cfg.MetricsAddr, err)
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"startup", c.StartupProbe, "/healthz"}, {"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s probe: want an HTTP GET", p.name)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path {
			t.Errorf("%s probe path %q, want %q", p.name, g.Path, p.path)
		}
		// With hostNetwork the kubelet probes the pod IP, the node's,
		// unless host says otherwise: it must be where the agent listens.
		if g.Host != host {
			t.Errorf("%s probe host %q, want %q, the agent's --metrics-addr host", p.name, g.Host, host)
		}
		if got := probePort(t, c, g.Port.String()); got != port {
			t.Errorf("%s probe port %s, want %s", p.name, got, port)
		}
	}

	// Mounts: each host path the design names, mounted; the agent's paths
	// reach the host through them.
	mounts := map[string]corev1.VolumeMount{} // host path -> mount
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name == v.Name {
				mounts[v.HostPath.Path] = m
			}
		}
	}
	for _, hp := range []string{"/opt/cni/bin", "/etc/cni/net.d", "/etc/cni/net.d-shm", "/run/shm-cni", "/var/lib/shm-cni", "/var/run/netns"} {
		if _, ok := mounts[hp]; !ok {
			t.Errorf("host path %s not mounted", hp)
		}
	}
	if m := mounts["/var/run/netns"]; m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
		got := "unset"
		if m.MountPropagation != nil {
			got = string(*m.MountPropagation)
		}
		t.Errorf("/var/run/netns mount propagation %s, want HostToContainer (netns mounted after the agent started)", got)
	}
	under := func(flag, path, hostPath string, same bool) {
		m, ok := mounts[hostPath]
		if !ok {
			return
		}
		if same && m.MountPath != hostPath {
			t.Errorf("%s is mounted at %s: the CNI binary, on the host, reaches the agent's socket at the same path only when both are %s", hostPath, m.MountPath, hostPath)
		}
		if rel, err := filepath.Rel(m.MountPath, path); err != nil || strings.HasPrefix(rel, "..") {
			t.Errorf("--%s %s is not under the mount of host %s (%s)", flag, path, hostPath, m.MountPath)
		}
	}
	under("socket", cfg.SocketPath, "/run/shm-cni", true)
	under("sandbox-dir", cfg.SandboxDir, "/run/shm-cni", true)
	under("state-dir", cfg.StateDir, "/var/lib/shm-cni", false)
	under("cni-bin-dir", cfg.CNIBinDir, "/opt/cni/bin", false)
	under("cni-conf-dir", cfg.CNIConfDir, "/etc/cni/net.d", false)
	under("cni-shm-conf-dir", cfg.CNIShmConfDir, "/etc/cni/net.d-shm", false)
	if cfg.CNIBinDir != mounts["/opt/cni/bin"].MountPath || cfg.CNIConfDir != mounts["/etc/cni/net.d"].MountPath ||
		cfg.CNIShmConfDir != mounts["/etc/cni/net.d-shm"].MountPath {
		t.Errorf("--cni-bin-dir %s / --cni-conf-dir %s / --cni-shm-conf-dir %s are not the host directories' mount paths",
			cfg.CNIBinDir, cfg.CNIConfDir, cfg.CNIShmConfDir)
	}
	if cfg.CNIBinarySource != "/usr/local/bin/shm-cni" {
		t.Errorf("--cni-binary-source %q, want the image's /usr/local/bin/shm-cni", cfg.CNIBinarySource)
	}
	if want := []string{"/usr/local/bin/portmap"}; !slices.Equal(cfg.CNIChainedBinaries, want) {
		t.Errorf("--cni-chained-binaries %q, want %q", cfg.CNIChainedBinaries, want)
	}
	inImage := imageFiles(t)
	for _, b := range append([]string{cfg.CNIBinarySource}, cfg.CNIChainedBinaries...) {
		if !slices.Contains(inImage, b) {
			t.Errorf("%s is not in the image, which holds %q (the Dockerfile's COPY)", b, inImage)
		}
	}

	// The conflist comes from the ConfigMap volume.
	var cmVol *corev1.Volume
	for i, v := range spec.Volumes {
		if v.ConfigMap != nil && v.ConfigMap.Name == d.cm.Name {
			cmVol = &spec.Volumes[i]
		}
	}
	if cmVol == nil {
		t.Fatal("no volume of the ConfigMap")
	}
	var cmMount string
	for _, m := range c.VolumeMounts {
		if m.Name == cmVol.Name {
			cmMount = m.MountPath
		}
	}
	key := ""
	for _, it := range cmVol.ConfigMap.Items {
		if filepath.Join(cmMount, it.Path) == cfg.CNIConfSource {
			key = it.Key
		}
	}
	if key == "" {
		t.Fatalf("--cni-conf-source %s is no item of the ConfigMap volume at %s", cfg.CNIConfSource, cmMount)
	}
	if _, ok := d.cm.Data[key]; !ok {
		t.Errorf("ConfigMap has no key %s", key)
	}
}

// imageFiles returns the files the Dockerfile copies into the image (its
// final COPY; hack/image's tests hold make image's image to the same).
func imageFiles(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 3 || f[0] != "COPY" || !slices.Contains(f, "--from=build") {
			continue
		}
		files = nil
		dst := f[len(f)-1]
		for _, src := range f[1 : len(f)-1] {
			if !strings.HasPrefix(src, "--") {
				files = append(files, filepath.Join(dst, filepath.Base(src)))
			}
		}
	}
	if len(files) == 0 {
		t.Fatal("the Dockerfile has no COPY --from=build")
	}
	return files
}

func findEnv(c corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

// probePort resolves a probe's port, by number or by the container port's
// name.
func probePort(t *testing.T, c corev1.Container, p string) string {
	t.Helper()
	if _, err := strconv.Atoi(p); err == nil {
		return p
	}
	for _, cp := range c.Ports {
		if cp.Name == p {
			return strconv.Itoa(int(cp.ContainerPort))
		}
	}
	t.Errorf("probe port %q names no container port", p)
	return ""
}

// makeVar returns a Makefile variable's default (NAME ?= value).
func makeVar(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^` + name + `\s*\?=\s*(\S+)\s*$`)
	m := re.FindSubmatch(b)
	if m == nil {
		t.Fatalf("Makefile defines no %s", name)
	}
	return string(m[1])
}

// deployConflist returns the ConfigMap's conflist, as libcni loads it, and
// the agent's configuration.
func deployConflist(t *testing.T) (*libcni.NetworkConfigList, agent.Config) {
	t.Helper()
	d := loadDeployment(t)
	cfg := agentConfig(t, d.ds.Spec.Template.Spec.Containers[0], d.cm)
	name := filepath.Base(cfg.CNIConfSource)
	if !strings.HasSuffix(name, ".conflist") {
		t.Errorf("conflist file name %q: runtimes load it only with a .conflist suffix", name)
	}
	var data string
	for k, v := range d.cm.Data {
		if k == name {
			data = v
		}
	}
	if data == "" {
		t.Fatalf("ConfigMap has no %s", name)
	}
	list, err := libcni.ConfListFromBytes([]byte(data))
	if err != nil {
		t.Fatalf("libcni: %v", err)
	}
	return list, cfg
}

// portmapBackend returns the backend of the conflist's portmap plugin.
func portmapBackend(t *testing.T, list *libcni.NetworkConfigList) string {
	t.Helper()
	for _, p := range list.Plugins {
		if p.Network.Type != "portmap" {
			continue
		}
		var c struct {
			Backend string `json:"backend"`
		}
		if err := yaml.Unmarshal(p.Bytes, &c); err != nil { // JSON is YAML
			t.Fatalf("portmap plugin: %v", err)
		}
		return c.Backend
	}
	t.Fatal("no portmap plugin in the conflist")
	return ""
}

// TestDeployConflist: the ConfigMap's conflist is what the agent installs:
// it loads as runtimes load it (libcni), is cniVersion 1.1.0, its shm-cni
// entry passes shm-cni's own parser and calls the agent's --socket; then
// portmap, asking for the pods' port mappings (hostPort), on a backend it
// has. Every plugin it names is one the agent installs: no node lacks one.
func TestDeployConflist(t *testing.T) {
	list, cfg := deployConflist(t)
	if list.CNIVersion != "1.1.0" {
		t.Errorf("cniVersion %q, want 1.1.0", list.CNIVersion)
	}
	found := 0
	for i, p := range list.Plugins {
		if p.Network.Type != agent.PluginType {
			continue
		}
		found++
		pc, err := agent.ParsePluginConfig(list, i)
		if err != nil {
			t.Errorf("shm-cni refuses plugin %d: %v", i, err)
			continue
		}
		if pc.AgentSocket != cfg.SocketPath {
			t.Errorf("agentSocket %q, the agent's --socket is %q", pc.AgentSocket, cfg.SocketPath)
		}
		if pc.DelegatesIPAM() {
			t.Errorf("plugin %d names IPAM %q: the agent allocates from the Node's pod CIDRs", i, pc.IPAM.Type)
		}
	}
	if found != 1 {
		t.Errorf("%d shm-cni plugins in the conflist, want 1", found)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
	}
	if want := []string{agent.PluginType, "portmap"}; !slices.Equal(types, want) {
		t.Errorf("plugins %q, want %q: shm-cni, then portmap for hostPorts", types, want)
	}
	if pm := list.Plugins[len(list.Plugins)-1]; pm.Network.Type == "portmap" && !pm.Network.Capabilities["portMappings"] {
		t.Errorf("portmap capabilities %v: without portMappings the runtime passes no hostPorts", pm.Network.Capabilities)
	}
	if b := portmapBackend(t, list); b != "iptables" && b != "nftables" {
		t.Errorf("portmap backend %q, want iptables or nftables", b)
	}
	installed := []string{agent.PluginType}
	for _, b := range cfg.CNIChainedBinaries {
		installed = append(installed, filepath.Base(b))
	}
	for _, typ := range types {
		if !slices.Contains(installed, typ) {
			t.Errorf("plugin %s: the agent installs %q only (--cni-binary-source, --cni-chained-binaries)", typ, installed)
		}
	}
}

// TestKindCluster: the kind cluster config decodes strictly into kind's
// v1alpha4 types and says what run.sh needs: no default CNI, one control
// plane and two workers, pod and service subnets inside the cluster CIDRs
// the DaemonSet gives the agent (never masqueraded), the service subnet its
// --service-cidr, kube-proxy in the mode of the conflist's portmap backend.
func TestKindCluster(t *testing.T) {
	b, err := os.ReadFile("cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c kindv1alpha4.Cluster
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		t.Fatalf("cluster.yaml: %v", err)
	}
	if c.Kind != "Cluster" || c.APIVersion != "kind.x-k8s.io/v1alpha4" {
		t.Errorf("kind %q apiVersion %q, want Cluster kind.x-k8s.io/v1alpha4", c.Kind, c.APIVersion)
	}
	kindv1alpha4.SetDefaultsCluster(&c)
	if !c.Networking.DisableDefaultCNI {
		t.Error("disableDefaultCNI is not set: kindnet would be the pod network")
	}
	roles := map[kindv1alpha4.NodeRole]int{}
	for _, n := range c.Nodes {
		roles[n.Role]++
	}
	if roles[kindv1alpha4.ControlPlaneRole] != 1 || roles[kindv1alpha4.WorkerRole] != 2 || len(c.Nodes) != 3 {
		t.Errorf("nodes %v, want one control plane and two workers", roles)
	}
	list, cfg := deployConflist(t)
	if b := portmapBackend(t, list); b != string(c.Networking.KubeProxyMode) {
		t.Errorf("the conflist's portmap backend is %s, kube-proxy's mode %s: hostPorts and Services want their NAT in one place", b, c.Networking.KubeProxyMode)
	}
	for _, s := range []struct{ name, cidr string }{{"podSubnet", c.Networking.PodSubnet}, {"serviceSubnet", c.Networking.ServiceSubnet}} {
		p, err := netip.ParsePrefix(s.cidr)
		if err != nil {
			t.Errorf("%s %q: %v", s.name, s.cidr, err)
			continue
		}
		if !slices.ContainsFunc(cfg.ClusterCIDRs, func(q netip.Prefix) bool { return q.Bits() <= p.Bits() && q.Contains(p.Addr()) }) {
			t.Errorf("%s %s is not inside the agent's --cluster-cidr %v", s.name, p, cfg.ClusterCIDRs)
		}
	}
	if svc := netip.MustParsePrefix(c.Networking.ServiceSubnet); !slices.Equal(cfg.ServiceCIDRs, []netip.Prefix{svc}) {
		t.Errorf("the agent's --service-cidr %v, want the cluster's serviceSubnet %s", cfg.ServiceCIDRs, svc)
	}
}

// TestRunScript: the tier's scripts are executable (engine.sh is sourced)
// and parse; shellcheck, when installed, finds nothing.
func TestRunScript(t *testing.T) {
	scripts := []string{"run.sh", "conformance.sh", "engine.sh", filepath.Join(root, "hack", "kind-node-image.sh")}
	for _, s := range scripts {
		fi, err := os.Stat(s)
		if err != nil {
			t.Fatal(err)
		}
		if s != "engine.sh" && fi.Mode().Perm()&0o111 == 0 {
			t.Errorf("%s is not executable", s)
		}
		if out, err := exec.Command("bash", "-n", s).CombinedOutput(); err != nil {
			t.Errorf("bash -n %s: %v\n%s", s, err, out)
		}
	}
	sc, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Log("shellcheck not installed: not run")
		return
	}
	if out, err := exec.Command(sc, append([]string{"-x"}, scripts...)...).CombinedOutput(); err != nil {
		t.Errorf("shellcheck: %v\n%s", err, out)
	}
}
