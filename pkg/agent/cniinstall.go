package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/containernetworking/cni/libcni"

	"github.com/shm-cni/shm-cni/pkg/cni"
)

// PluginType is the CNI plugin type of shm-cni, the name of its binary in
// the CNI binary directory.
const PluginType = "shm-cni"

// installCNI installs the CNI binaries (shm-cni, then the chained plugins
// such as portmap), then the conflist, as the configuration asks: called
// once the agent serves, so that a runtime never finds a conflist whose
// plugin cannot reach a ready agent. The binaries go first: a runtime that
// sees the conflist finds every plugin it names.
//
// All stay when the agent stops. A runtime without the conflist could
// not run DEL for the pods torn down while the agent restarts (a rolling
// update, a crash), and they would hang in Terminating; with it, ADD fails
// with "try again" (code 11) and STATUS reports the agent not ready (code
// 50) until the next agent serves. Uninstalling is removing both files.
func (a *Agent) installCNI() error {
	// The conflists are vetted before anything is installed.
	var conf, shmConf []byte
	if src := a.cfg.CNIConfSource; src != "" {
		var err error
		if conf, err = os.ReadFile(src); err != nil {
			return fmt.Errorf("install CNI config: %w", err)
		}
		if err := a.checkConflist(conf); err != nil {
			return fmt.Errorf("install CNI config: %s: %w", src, err)
		}
		if a.cfg.CNIShmConfDir != "" {
			if shmConf, err = withKind(conf, cni.KindShm); err == nil {
				err = a.checkConflist(shmConf)
			}
			if err != nil {
				return fmt.Errorf("install CNI config for shared-memory sandboxes: %s: %w", src, err)
			}
		}
	}
	for _, b := range a.binaries() {
		bin, err := os.ReadFile(b.src)
		if err != nil {
			return fmt.Errorf("install CNI binary: %w", err)
		}
		dst := filepath.Join(a.cfg.CNIBinDir, b.name)
		changed, err := installFile(dst, bin, 0o755)
		if err != nil {
			return fmt.Errorf("install CNI binary: %w", err)
		}
		a.log.Info("CNI binary installed", "path", dst, "changed", changed)
	}
	for _, c := range []struct {
		dir  string
		data []byte
	}{{a.cfg.CNIConfDir, conf}, {a.cfg.CNIShmConfDir, shmConf}} {
		if c.data == nil {
			continue
		}
		dst := filepath.Join(c.dir, filepath.Base(a.cfg.CNIConfSource))
		changed, err := installFile(dst, c.data, 0o644)
		if err != nil {
			return fmt.Errorf("install CNI config: %w", err)
		}
		a.log.Info("CNI config installed", "path", dst, "changed", changed)
	}
	return nil
}

// cniBinary is a CNI plugin binary the agent installs: src, the file in
// the agent's image, as CNIBinDir/name.
type cniBinary struct{ src, name string }

// binaries returns the CNI binaries the agent installs, in order: shm-cni
// (CNIBinarySource, as PluginType), then the chained plugins
// (CNIChainedBinaries, under their own names).
func (a *Agent) binaries() []cniBinary {
	var out []cniBinary
	if a.cfg.CNIBinarySource != "" {
		out = append(out, cniBinary{a.cfg.CNIBinarySource, PluginType})
	}
	for _, src := range a.cfg.CNIChainedBinaries {
		out = append(out, cniBinary{src, filepath.Base(src)})
	}
	return out
}

// withKind returns the conflist data with the kind of every shm-cni plugin
// set to kind: the conflist of the runtime handler whose sandboxes attach
// shared-memory links (runsc with --sharedmem-links reads its own CNI
// config directory, see --cni-shm-conf-dir), so that its pods get them
// without annotations or CNI args.
func withKind(data []byte, kind string) ([]byte, error) {
	var list map[string]any
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, err
	}
	plugins, _ := list["plugins"].([]any)
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			m["kind"] = kind
		}
	}
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

// checkConflist refuses a conflist that a runtime or shm-cni would refuse:
// it must parse as libcni does, have a shm-cni plugin, and every shm-cni
// entry must pass shm-cni's own config parser. Where the agent installs
// CNI binaries, every plugin the conflist names must be one it installs
// or already be in CNIBinDir: a runtime would fail every pod's ADD (and a
// CNI 1.1.0 runtime's STATUS, keeping the node NotReady) for a missing
// one. An agentSocket other than the agent's is only logged: the conflist
// names the path the runtime sees, which a container may mount elsewhere;
// so is a shm-cni entry without the bandwidth capability, which runtimes
// then do not pass (pods' bandwidth annotations would be ignored).
func (a *Agent) checkConflist(data []byte) error {
	list, err := libcni.ConfListFromBytes(data)
	if err != nil {
		return err
	}
	found := false
	for i, p := range list.Plugins {
		if p.Network.Type != PluginType {
			continue
		}
		found = true
		c, err := ParsePluginConfig(list, i)
		if err != nil {
			return fmt.Errorf("plugin %d: %w", i, err)
		}
		if c.AgentSocket != a.cfg.SocketPath {
			a.log.Warn("the conflist's agentSocket is not the agent's --socket", "agentSocket", c.AgentSocket, "socket", a.cfg.SocketPath)
		}
		if !p.Network.Capabilities[cni.BandwidthCapability] {
			a.log.Warn(`the conflist's shm-cni entry does not declare "capabilities": {"bandwidth": true}: runtimes will not pass pods' bandwidth limits`, "plugin", i)
		}
	}
	if !found {
		return fmt.Errorf("no plugin of type %s in the conflist", PluginType)
	}
	return a.checkPluginsPresent(list)
}

// checkPluginsPresent reports the first plugin of list that is neither
// among the binaries the agent installs nor a file in CNIBinDir. Without
// binaries to install the agent does not manage CNIBinDir, and checks
// nothing.
func (a *Agent) checkPluginsPresent(list *libcni.NetworkConfigList) error {
	bins := a.binaries()
	if len(bins) == 0 {
		return nil
	}
	for i, p := range list.Plugins {
		typ := p.Network.Type
		if slices.ContainsFunc(bins, func(b cniBinary) bool { return b.name == typ }) {
			continue
		}
		// A type is a file name in the CNI binary directory, never a path.
		if typ == "" || typ != filepath.Base(typ) {
			return fmt.Errorf("plugin %d: type %q is not a file name", i, typ)
		}
		if fi, err := os.Stat(filepath.Join(a.cfg.CNIBinDir, typ)); err != nil || !fi.Mode().IsRegular() {
			return fmt.Errorf("plugin %d: no %s in %s, and the agent installs none (--cni-chained-binaries): the runtime could run no pod", i, typ, a.cfg.CNIBinDir)
		}
	}
	return nil
}

// ParsePluginConfig parses plugin i of list as shm-cni does when a runtime
// runs it: the entry with the list's name and cniVersion, as libcni passes
// it on stdin.
func ParsePluginConfig(list *libcni.NetworkConfigList, i int) (*cni.Config, error) {
	var m map[string]any
	if err := json.Unmarshal(list.Plugins[i].Bytes, &m); err != nil {
		return nil, err
	}
	m["name"] = list.Name
	m["cniVersion"] = list.CNIVersion
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return cni.ParseConfig(b)
}

// installFile writes data to dst with mode perm atomically: a temporary
// file in dst's directory, synced, then renamed over dst, so a reader (a
// runtime exec'ing the plugin, loading the conflist) sees the old file or
// the new one, never a part. Identical content is left alone (no rename:
// no reload event for the runtime); changed reports whether dst was
// written.
func installFile(dst string, data []byte, perm os.FileMode) (changed bool, err error) {
	// Stat first: the binary is megabytes, read only when it may match.
	if fi, err := os.Stat(dst); err == nil && fi.Mode().Perm() == perm && fi.Size() == int64(len(data)) {
		if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
			return false, nil
		}
	}
	dir := filepath.Dir(dst)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	// The temporary name starts with a dot and does not end in .conflist,
	// so a runtime watching dir never loads it.
	f, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".tmp")
	if err != nil {
		return false, err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return false, err
	}
	// The rename itself survives a crash; a file system that cannot sync
	// a directory says EINVAL.
	if err := syncDir(dir); err != nil && !errors.Is(err, syscall.EINVAL) {
		return true, err
	}
	return true, nil
}
