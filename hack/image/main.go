// Command image builds the shm-cni container image without a Docker engine:
// the same image the Dockerfile describes (static binaries under
// /usr/local/bin on an empty base, the agent as entrypoint, the same labels),
// written as a docker-archive tarball that `ctr images import`,
// `docker load` and `kind load image-archive` accept, and optionally as an
// OCI image layout directory.
//
//	go run ./hack/image -o bin/shm-cni-image.tar --tag shm-cni:dev
//
// It builds the binaries itself with the Dockerfile's flags (CGO_ENABLED=0,
// -trimpath, -buildvcs=false, -ldflags=-s), unless -bin names a directory
// holding them already. Files and config carry a fixed timestamp, so the
// same sources give the same image digest.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// spec is the image's content; the Dockerfile says the same (checked by
// TestDockerfileMatchesImage).
var spec = struct {
	// BinDir is where the binaries go.
	BinDir string
	// Packages are the commands built, in the image as
	// BinDir/<base name of the package>: the agent, the CNI plugin it
	// installs, and the reference portmap plugin (hostPort) it installs
	// beside it, which deploy/'s conflist chains after shm-cni; portmap at
	// the version go.mod pins (a tool directive, so go.sum covers it),
	// built with our flags.
	Packages []string
	// Entrypoint is the config's entrypoint.
	Entrypoint []string
	// Labels are the config's labels.
	Labels map[string]string
	// Env is the config's environment: BuildKit gives every image this
	// PATH.
	Env []string
	// BuildFlags are go build's flags, CGOEnabled its CGO_ENABLED.
	BuildFlags []string
	CGOEnabled string
}{
	BinDir:     "/usr/local/bin",
	Packages:   []string{"./cmd/shm-agent", "./cmd/shm-cni", "github.com/containernetworking/plugins/plugins/meta/portmap"},
	Entrypoint: []string{"/usr/local/bin/shm-agent"},
	Labels: map[string]string{
		"org.opencontainers.image.title":       "shm-cni",
		"org.opencontainers.image.description": "shm-cni node agent and CNI plugin",
		"org.opencontainers.image.source":      "https://github.com/shm-cni/shm-cni",
	},
	Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
	BuildFlags: []string{"-trimpath", "-buildvcs=false", "-ldflags=-s"},
	CGOEnabled: "0",
}

// epoch is the timestamp of every file and of the config: fixed, so that
// builds are reproducible.
var epoch = time.Unix(0, 0).UTC()

// binaryNames returns the binaries' file names, in spec.Packages order.
func binaryNames() []string {
	out := make([]string, len(spec.Packages))
	for i, p := range spec.Packages {
		out[i] = path.Base(p)
	}
	return out
}

func main() { os.Exit(run()) }

func run() int {
	out := flag.String("o", "bin/shm-cni-image.tar", "docker-archive tarball to write")
	tag := flag.String("tag", "shm-cni:dev", "the image's tag")
	ociDir := flag.String("oci-layout", "", "also write an OCI image layout to this directory")
	binDir := flag.String("bin", "", "directory holding the static binaries already built (shm-agent, shm-cni, portmap); empty builds them")
	arch := flag.String("arch", runtime.GOARCH, "target architecture (GOARCH)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := buildImage(ctx, log, options{Out: *out, Tag: *tag, OCILayout: *ociDir, BinDir: *binDir, Arch: *arch}); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		return 1
	}
	return 0
}

// options are the command's flags.
type options struct {
	Out, Tag, OCILayout, BinDir, Arch string
}

// buildImage builds (unless o.BinDir) and writes the image.
func buildImage(ctx context.Context, log *slog.Logger, o options) error {
	ref, err := name.NewTag(o.Tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", o.Tag, err)
	}
	bin := o.BinDir
	if bin == "" {
		tmp, err := os.MkdirTemp("", "shm-image")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		if err := buildBinaries(ctx, tmp, o.Arch); err != nil {
			return err
		}
		bin = tmp
	}
	img, err := newImage(bin, o.Arch)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.Out), 0o755); err != nil {
		return err
	}
	if err := writeArchive(o.Out, ref, img); err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	log.Info("wrote docker archive", "path", o.Out, "tag", ref.String(), "digest", d.String())
	if o.OCILayout != "" {
		p, err := layout.Write(o.OCILayout, empty.Index)
		if err != nil {
			return fmt.Errorf("oci layout %s: %w", o.OCILayout, err)
		}
		if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
			"org.opencontainers.image.ref.name": ref.String(),
		})); err != nil {
			return fmt.Errorf("oci layout %s: %w", o.OCILayout, err)
		}
		log.Info("wrote OCI layout", "path", o.OCILayout)
	}
	return nil
}

// buildBinaries runs go build with the Dockerfile's flags into outDir,
// in the root of the module the current directory is in.
func buildBinaries(ctx context.Context, outDir, arch string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	gomod, err := exec.CommandContext(ctx, goBin, "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if strings.TrimSpace(string(gomod)) == "" || strings.TrimSpace(string(gomod)) == os.DevNull {
		return errors.New("not inside the shm-cni module: run from its directory")
	}
	if outDir, err = filepath.Abs(outDir); err != nil {
		return err
	}
	args := append([]string{"build"}, spec.BuildFlags...)
	args = append(args, "-o", outDir+string(filepath.Separator))
	args = append(args, spec.Packages...)
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED="+spec.CGOEnabled, "GOOS=linux", "GOARCH="+arch)
	var outb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outb, &outb
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, outb.Bytes())
	}
	return nil
}

// newImage assembles the image from the binaries in binDir: one layer,
// the config of spec.
func newImage(binDir, arch string) (v1.Image, error) {
	layerTar, err := binaryLayer(binDir)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: arch,
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint: spec.Entrypoint,
			Env:        spec.Env,
			Labels:     spec.Labels,
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	img, err = mutate.Append(img, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "hack/image: COPY " + strings.Join(binaryNames(), " ") + " " + spec.BinDir + "/",
		},
	})
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	return img, nil
}

// binaryLayer returns the layer's uncompressed tar: the directories of
// spec.BinDir and every binary, owned by root, mode 0755.
func binaryLayer(binDir string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := strings.Trim(spec.BinDir, "/")
	var parents []string
	for d := dir; d != "." && d != ""; d = path.Dir(d) {
		parents = append([]string{d + "/"}, parents...)
	}
	for _, d := range parents {
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX,
		}); err != nil {
			return nil, err
		}
	}
	for _, b := range binaryNames() {
		data, err := os.ReadFile(filepath.Join(binDir, b))
		if err != nil {
			return nil, fmt.Errorf("binary: %w", err)
		}
		if err := checkStatic(b, data); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeReg, Name: path.Join(dir, b), Mode: 0o755, Size: int64(len(data)),
			ModTime: epoch, Format: tar.FormatPAX,
		}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeArchive writes img tagged ref as a docker-archive tarball, through a
// temporary file renamed into place.
func writeArchive(out string, ref name.Tag, img v1.Image) (err error) {
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := tarball.Write(ref, img, f); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), out); err != nil {
		return errors.Join(err, os.Remove(f.Name()))
	}
	return nil
}

// checkStatic refuses a binary that is not a static ELF executable: on the
// empty base there is no dynamic loader and no libc.
func checkStatic(name string, data []byte) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("binary %s: %w", name, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			return fmt.Errorf("binary %s is dynamically linked; build it with CGO_ENABLED=0", name)
		}
	}
	return nil
}
