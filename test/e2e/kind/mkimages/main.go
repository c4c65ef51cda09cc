// Command mkimages builds the container images a kind node preloads (the
// control plane's, kube-proxy, etcd, CoreDNS, pause, the test images) from
// binaries and root filesystems built on this machine, with no registry, and
// writes them all into one docker-archive tarball that `ctr images import`
// and `docker load` accept. Layers shared between images (a root filesystem
// under several tools) are written once.
//
//	mkimages -spec images.json -o images.tar
//
// The spec is a JSON list of images:
//
//	[{"tags": ["registry.k8s.io/pause:3.10.2"],
//	  "layers": [{"tar": "rootfs.tar"},
//	             {"files": ["bin/pause:/pause:0755"], "symlinks": ["/x=y"], "dirs": ["/uploads"]}],
//	  "entrypoint": ["/pause"], "cmd": [], "env": ["K=V"], "user": "", "workdir": "",
//	  "stopsignal": ""}]
//
// A layer may say "stored": true (gzip without compression).
//
// A file is HOSTPATH:IMAGEPATH[:OCTALMODE] (mode 0755 by default). Every
// timestamp is the epoch, so the same inputs give the same image digests.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/shm-cni/shm-cni/test/e2e/imagefile"
)

// image is one entry of the spec.
type image struct {
	Tags       []string `json:"tags"`
	Layers     []layer  `json:"layers"`
	Entrypoint []string `json:"entrypoint"`
	Cmd        []string `json:"cmd"`
	Env        []string `json:"env"`
	User       string   `json:"user"`
	Workdir    string   `json:"workdir"`
	StopSignal string   `json:"stopsignal"`
}

// layer is a tar file of the host (a root filesystem) or files, symlinks
// and directories packed here. A stored layer is gzip without compression:
// a root filesystem of gigabytes is written and loaded in seconds.
type layer struct {
	Tar      string   `json:"tar"`
	Stored   bool     `json:"stored"`
	Files    []string `json:"files"`
	Symlinks []string `json:"symlinks"`
	Dirs     []string `json:"dirs"`
}

// defaultPath is the PATH of every image unless its env sets one.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

var epoch = time.Unix(0, 0)

func main() { os.Exit(run()) }

func run() int {
	specFile := flag.String("spec", "", "JSON list of images (required)")
	out := flag.String("o", "", "output docker-archive tarball (required)")
	flag.Parse()
	if *specFile == "" || *out == "" {
		flag.Usage()
		return 2
	}
	if err := build(*specFile, *out); err != nil {
		fmt.Fprintf(os.Stderr, "mkimages: %v\n", err)
		return 1
	}
	return 0
}

func build(specFile, out string) error {
	b, err := os.ReadFile(specFile)
	if err != nil {
		return err
	}
	var spec []image
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("%s: %w", specFile, err)
	}
	// One layer object per tar file, so that images sharing it share its
	// digest computation and its one copy in the archive.
	tars := map[string]v1.Layer{}
	refs := map[name.Reference]v1.Image{}
	for i, im := range spec {
		if len(im.Tags) == 0 {
			return fmt.Errorf("image %d: no tag", i)
		}
		img, err := newImage(im, tars)
		if err != nil {
			return fmt.Errorf("image %s: %w", im.Tags[0], err)
		}
		for _, t := range im.Tags {
			ref, err := name.NewTag(t, name.StrictValidation)
			if err != nil {
				return fmt.Errorf("tag %q: %w", t, err)
			}
			refs[ref] = img
		}
	}
	tmp := out + ".tmp"
	if err := tarball.MultiRefWriteToFile(tmp, refs); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", out, err)
	}
	return os.Rename(tmp, out)
}

func newImage(im image, tars map[string]v1.Layer) (v1.Image, error) {
	env := im.Env
	if !slicesHasPrefix(env, "PATH=") {
		env = append([]string{defaultPath}, env...)
	}
	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint: im.Entrypoint,
			Cmd:        im.Cmd,
			Env:        env,
			User:       im.User,
			WorkingDir: im.Workdir,
			StopSignal: im.StopSignal,
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	for j, l := range im.Layers {
		var lay v1.Layer
		what := ""
		level := tarball.WithCompressionLevel(gzip.BestSpeed)
		if l.Stored {
			level = tarball.WithCompressionLevel(gzip.NoCompression)
		}
		switch {
		case l.Tar != "" && (len(l.Files)+len(l.Symlinks)+len(l.Dirs)) > 0:
			return nil, fmt.Errorf("layer %d: a tar or files, not both", j)
		case l.Tar != "":
			what = "ADD " + path.Base(l.Tar)
			lay = tars[l.Tar]
			if lay == nil {
				lay, err = tarball.LayerFromFile(l.Tar, level)
				if err != nil {
					return nil, fmt.Errorf("layer %d: %w", j, err)
				}
				tars[l.Tar] = lay
			}
		default:
			data, err := filesLayer(l)
			if err != nil {
				return nil, fmt.Errorf("layer %d: %w", j, err)
			}
			what = "COPY " + strings.Join(l.Files, " ")
			lay, err = tarball.LayerFromOpener(func() (io.ReadCloser, error) {
				return io.NopCloser(bytes.NewReader(data)), nil
			}, level)
			if err != nil {
				return nil, fmt.Errorf("layer %d: %w", j, err)
			}
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer:   lay,
			History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "mkimages: " + what},
		})
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", j, err)
		}
	}
	return img, nil
}

func slicesHasPrefix(l []string, p string) bool {
	for _, s := range l {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// filesLayer packs a layer's files, symlinks and directories, with the
// parent directories of each, owned by root.
func filesLayer(l layer) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	mkdir := func(d string, mode int64) error {
		if d == "/" || d == "." || dirs[d] {
			return nil
		}
		dirs[d] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d[1:] + "/", Mode: mode, ModTime: epoch})
	}
	parents := func(p string) error {
		var ps []string
		for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
			ps = append(ps, d)
		}
		sort.Strings(ps) // outermost first
		for _, d := range ps {
			if err := mkdir(d, 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	for _, d := range l.Dirs {
		if !path.IsAbs(d) {
			return nil, fmt.Errorf("directory %q: not absolute", d)
		}
		if err := parents(d); err != nil {
			return nil, err
		}
		mode := int64(0o755)
		if d == "/tmp" {
			mode = 0o1777
		}
		if err := mkdir(path.Clean(d), mode); err != nil {
			return nil, err
		}
	}
	for _, a := range l.Files {
		f, err := imagefile.Parse(a)
		if err != nil {
			return nil, err
		}
		data, err := os.ReadFile(f.Host)
		if err != nil {
			return nil, fmt.Errorf("file %q: %w", a, err)
		}
		if err := parents(f.Path); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.Image, Mode: f.Mode, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	for _, s := range l.Symlinks {
		link, target, ok := strings.Cut(s, "=")
		if !ok || !path.IsAbs(link) || target == "" {
			return nil, fmt.Errorf("symlink %q: want /LINK=TARGET", s)
		}
		if err := parents(link); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: link[1:], Linkname: target, Mode: 0o777, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if buf.Len() == 0 {
		return nil, errors.New("empty layer")
	}
	return buf.Bytes(), nil
}
