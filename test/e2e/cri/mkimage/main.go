// Command mkimage packs files of the host into a one-layer container image
// and writes it as a docker-archive tarball (the `docker save` format), which
// `ctr images import` and `podman load` accept. The runtime tiers build their
// pause and busybox images with it, so they need no registry.
//
//	mkimage -ref shm-cni.test/busybox:e2e -o busybox.tar -cmd /bin/sh \
//	    -symlink /bin/sh=busybox /bin/busybox:/bin/busybox
//
// Arguments are HOSTPATH:IMAGEPATH[:OCTALMODE]; -symlink LINK=TARGET repeats.
// The archive is reproducible: every timestamp is the epoch.
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/imagefile"
)

func main() { os.Exit(run()) }

func run() int {
	ref := flag.String("ref", "", "image reference, name:tag (required)")
	out := flag.String("o", "", "output docker-archive tarball (required)")
	entry := flag.String("entrypoint", "", "entrypoint, space separated")
	cmd := flag.String("cmd", "", "cmd, space separated")
	var links listFlag
	flag.Var(&links, "symlink", "LINK=TARGET inside the image (repeatable)")
	flag.Parse()
	if *ref == "" || *out == "" || !strings.Contains(path.Base(*ref), ":") {
		fmt.Fprintln(os.Stderr, "mkimage: -ref name:tag and -o are required")
		flag.Usage()
		return 2
	}
	layer, err := buildLayer(flag.Args(), links)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	if err := writeArchive(*out, *ref, layer, strings.Fields(*entry), strings.Fields(*cmd)); err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		return 1
	}
	return 0
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// epoch is every entry's modification time.
var epoch = time.Unix(0, 0)

// buildLayer returns the layer tar: the directories a container expects,
// the files (HOSTPATH:IMAGEPATH[:MODE]) and the symlinks (LINK=TARGET).
func buildLayer(files, links []string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	mkdirs := func(p string) error {
		var parents []string
		for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
			parents = append(parents, d)
		}
		sort.Strings(parents) // shortest (outermost) first
		for _, d := range parents {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			mode := int64(0o755)
			if d == "/tmp" {
				mode = 0o1777
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d[1:] + "/", Mode: mode, ModTime: epoch}); err != nil {
				return fmt.Errorf("directory %s: %w", d, err)
			}
		}
		return nil
	}
	for _, d := range []string{"/tmp", "/proc", "/sys", "/dev", "/etc", "/run", "/var/run", "/bin"} {
		if err := mkdirs(d + "/x"); err != nil {
			return nil, err
		}
	}
	for _, a := range files {
		f, err := imagefile.Parse(a)
		if err != nil {
			return nil, err
		}
		data, err := os.ReadFile(f.Host)
		if err != nil {
			return nil, fmt.Errorf("file %q: %w", a, err)
		}
		if err := mkdirs(f.Path); err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: f.Image, Mode: f.Mode, Size: int64(len(data)), ModTime: epoch}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("file %q: %w", a, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("file %q: %w", a, err)
		}
	}
	for _, l := range links {
		link, target, ok := strings.Cut(l, "=")
		if !ok || !path.IsAbs(link) || target == "" {
			return nil, fmt.Errorf("symlink %q: want /LINK=TARGET", l)
		}
		if err := mkdirs(link); err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeSymlink, Name: link[1:], Linkname: target, Mode: 0o777, ModTime: epoch}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("symlink %q: %w", l, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	return buf.Bytes(), nil
}

// imageConfig is the part of the OCI image config mkimage writes.
type imageConfig struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Created      string `json:"created"`
	Config       struct {
		Env        []string `json:"Env"`
		Entrypoint []string `json:"Entrypoint,omitempty"`
		Cmd        []string `json:"Cmd,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// manifestEntry is one image of a docker-archive's manifest.json.
type manifestEntry struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// writeArchive writes the docker-archive: manifest.json, the config named by
// its digest, and the layer under its diff ID.
func writeArchive(out, ref string, layer []byte, entry, cmd []string) error {
	sum := sha256.Sum256(layer)
	layerHex := hex.EncodeToString(sum[:])
	var cfg imageConfig
	cfg.Architecture, cfg.OS, cfg.Created = runtime.GOARCH, "linux", epoch.UTC().Format(time.RFC3339)
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cfg.Config.Entrypoint, cfg.Config.Cmd = entry, cmd
	cfg.RootFS.Type, cfg.RootFS.DiffIDs = "layers", []string{"sha256:" + layerHex}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("image config: %w", err)
	}
	cfgSum := sha256.Sum256(cfgJSON)
	cfgName := hex.EncodeToString(cfgSum[:]) + ".json"
	layerName := layerHex + "/layer.tar"
	manifest, err := json.Marshal([]manifestEntry{{Config: cfgName, RepoTags: []string{ref}, Layers: []string{layerName}}})
	if err != nil {
		return fmt.Errorf("manifest: %w", err)
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: layerHex + "/", Mode: 0o755, ModTime: epoch}); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{layerName, layer}, {cfgName, cfgJSON}, {"manifest.json", manifest}} {
		if err := add(f.name, f.data); err != nil {
			return fmt.Errorf("write %s: %s: %w", out, f.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	fmt.Printf("wrote %s (layer sha256:%s) to %s\n", ref, layerHex[:12], out)
	return nil
}
