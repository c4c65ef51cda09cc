package main

import (
	"archive/tar"
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

const testTag = "shm-cni:test"

// The archive is built once per test binary run: go build of both
// binaries with the Dockerfile's flags, then the image, as `make image`
// does.
var (
	archiveOnce sync.Once
	archiveDir  string
	archiveErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if archiveDir != "" {
		os.RemoveAll(archiveDir)
	}
	os.Exit(code)
}

// builtArchive returns the docker archive and the OCI layout built from
// this module's sources.
func builtArchive(t *testing.T) (archive, oci string) {
	t.Helper()
	archiveOnce.Do(func() {
		archiveDir, archiveErr = os.MkdirTemp("", "shm-image-test")
		if archiveErr != nil {
			return
		}
		// A hang guard for the build, not a timing.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		bin := filepath.Join(archiveDir, "bin")
		if archiveErr = os.Mkdir(bin, 0o755); archiveErr != nil {
			return
		}
		if archiveErr = buildBinaries(ctx, bin, runtime.GOARCH); archiveErr != nil {
			return
		}
		archiveErr = buildImage(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), options{
			Out:       filepath.Join(archiveDir, "image.tar"),
			Tag:       testTag,
			OCILayout: filepath.Join(archiveDir, "oci"),
			BinDir:    bin,
			Arch:      runtime.GOARCH,
		})
	})
	if archiveErr != nil {
		t.Fatalf("build image: %v", archiveErr)
	}
	return filepath.Join(archiveDir, "image.tar"), filepath.Join(archiveDir, "oci")
}

// layerFile is a file of the image's layers.
type layerFile struct {
	hdr  *tar.Header
	head []byte // its first bytes
}

// imageFiles reads every layer of img, in order; later layers win.
func imageFiles(t *testing.T, img v1.Image) map[string]layerFile {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]layerFile{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("layer: %v", err)
			}
			head := make([]byte, 4)
			n, _ := io.ReadFull(tr, head)
			files[path.Clean(h.Name)] = layerFile{hdr: h, head: head[:n]}
		}
		rc.Close()
	}
	return files
}

// TestArchive: the docker archive `make image` writes carries the tag,
// the static executables (the agent, shm-cni, portmap) at /usr/local/bin
// with mode 0755 owned by root,
// and a config with the agent as entrypoint, the labels and linux/GOARCH;
// the OCI layout holds the same image.
func TestArchive(t *testing.T) {
	archive, oci := builtArchive(t)

	// The tag as docker load, ctr import and kind read it.
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == "manifest.json" {
			if err := json.NewDecoder(tr).Decode(&manifest); err != nil {
				t.Fatalf("manifest.json: %v", err)
			}
		}
	}
	if len(manifest) != 1 || !slices.Equal(manifest[0].RepoTags, []string{testTag}) {
		t.Fatalf("manifest.json %+v, want one image tagged %s", manifest, testTag)
	}

	tag, err := name.NewTag(testTag)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(archive, &tag)
	if err != nil {
		t.Fatalf("open archive: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := cf.Config.Entrypoint, []string{"/usr/local/bin/shm-agent"}; !slices.Equal(got, want) {
		t.Errorf("entrypoint %q, want %q", got, want)
	}
	if cf.Config.Cmd != nil {
		t.Errorf("cmd %q, want none", cf.Config.Cmd)
	}
	if got := cf.Config.Labels["org.opencontainers.image.title"]; got != "shm-cni" {
		t.Errorf("label org.opencontainers.image.title = %q, want shm-cni", got)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if cf.Config.User != "" {
		t.Errorf("user %q, want root (the agent is privileged)", cf.Config.User)
	}

	files := imageFiles(t, img)
	var bins []string
	for _, b := range []string{"shm-agent", "shm-cni", "portmap"} {
		bins = append(bins, "usr/local/bin/"+b)
	}
	for _, b := range bins {
		lf, ok := files[b]
		switch {
		case !ok:
			t.Errorf("%s missing from the image (has %v)", b, keys(files))
			continue
		case lf.hdr.Typeflag != tar.TypeReg:
			t.Errorf("%s: tar type %q, want a regular file", b, lf.hdr.Typeflag)
		case lf.hdr.FileInfo().Mode().Perm() != 0o755:
			t.Errorf("%s: mode %v, want 0755", b, lf.hdr.FileInfo().Mode().Perm())
		case lf.hdr.Uid != 0 || lf.hdr.Gid != 0:
			t.Errorf("%s: owner %d:%d, want 0:0", b, lf.hdr.Uid, lf.hdr.Gid)
		case string(lf.head) != "\x7fELF":
			t.Errorf("%s: not an ELF file (starts %q)", b, lf.head)
		}
	}
	for _, d := range []string{"usr", "usr/local", "usr/local/bin"} {
		if lf, ok := files[d]; !ok || lf.hdr.Typeflag != tar.TypeDir || lf.hdr.FileInfo().Mode().Perm() != 0o755 {
			t.Errorf("directory %s missing or not 0755 (%v)", d, ok)
		}
	}
	if len(files) != len(bins)+3 {
		t.Errorf("the image holds %v, want the binaries %v and their directories only", keys(files), bins)
	}

	// The OCI layout holds the same image, named by the tag.
	p, err := layout.FromPath(oci)
	if err != nil {
		t.Fatalf("oci layout: %v", err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	want, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != want ||
		im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != testTag {
		t.Errorf("oci layout index %+v, want one manifest %s named %s", im.Manifests, want, testTag)
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestCheckStatic: the image takes static executables only; a dynamically
// linked one (the system's /bin/sh, when it is dynamic) and a script are
// refused.
func TestCheckStatic(t *testing.T) {
	builtArchive(t)
	bin := filepath.Join(archiveDir, "bin")
	for _, b := range binaryNames() {
		data, err := os.ReadFile(filepath.Join(bin, b))
		if err != nil {
			t.Fatal(err)
		}
		if err := checkStatic(b, data); err != nil {
			t.Errorf("%s built with the Dockerfile's flags: %v", b, err)
		}
	}
	sh, err := os.ReadFile("/bin/sh")
	if err != nil {
		t.Skipf("no /bin/sh to try a dynamic binary: %v", err)
	}
	if err := checkStatic("sh", sh); err == nil {
		t.Log("/bin/sh is static here; the dynamic case is not exercised")
	} else if !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("checkStatic(/bin/sh): %v, want a dynamic-linking error", err)
	}
	if err := checkStatic("garbage", []byte("#!/bin/sh\n")); err == nil {
		t.Error("checkStatic accepted a script")
	}
}

// TestPluginsSpeakCNI110: every CNI plugin of the image (shm-cni and
// portmap) answers VERSION with 1.1.0 among its versions. deploy/'s
// conflist is 1.1.0, and containerd asks each plugin of a 1.1.0 conflist
// for STATUS: a plugin that speaks less (Debian's portmap, 1.0.0 at most)
// keeps the node NotReady.
func TestPluginsSpeakCNI110(t *testing.T) {
	builtArchive(t)
	for _, b := range []string{"shm-cni", "portmap"} {
		t.Run(b, func(t *testing.T) {
			cmd := exec.Command(filepath.Join(archiveDir, "bin", b))
			cmd.Env = []string{"CNI_COMMAND=VERSION"}
			cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("VERSION: %v", err)
			}
			var got struct {
				SupportedVersions []string `json:"supportedVersions"`
			}
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("VERSION answered %q: %v", out, err)
			}
			if !slices.Contains(got.SupportedVersions, "1.1.0") {
				t.Errorf("supported versions %v, want 1.1.0 among them", got.SupportedVersions)
			}
		})
	}
}

// dockerfile is what TestDockerfileMatchesImage reads of the Dockerfile.
type dockerfile struct {
	goVersion  string            // ARG GO_VERSION default
	final      string            // the last FROM's image
	env        map[string]string // ENV of the build stage
	buildArgs  []string          // the build stage's go build arguments
	copyFlags  []string          // the final COPY's flags
	copySrcs   []string          // its sources
	copyDst    string            // its destination
	labels     map[string]string // LABEL of the final stage
	entrypoint []string          // ENTRYPOINT of the final stage
}

// parseDockerfile reads the few instructions the image is made of:
// continuation lines joined, comments and the syntax directive skipped.
func parseDockerfile(t *testing.T, file string) dockerfile {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines []string
	var cur strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, "#") || (l == "" && cur.Len() == 0) {
			continue
		}
		if s, ok := strings.CutSuffix(l, `\`); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(l)
		lines = append(lines, cur.String())
		cur.Reset()
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	d := dockerfile{env: map[string]string{}, labels: map[string]string{}}
	stages := 0
	for _, l := range lines {
		instr, rest, _ := strings.Cut(l, " ")
		rest = strings.TrimSpace(rest)
		final := stages == 2
		switch strings.ToUpper(instr) {
		case "ARG":
			if v, ok := strings.CutPrefix(rest, "GO_VERSION="); ok {
				d.goVersion = v
			}
		case "FROM":
			stages++
			d.final = strings.Fields(rest)[0]
		case "ENV":
			k, v, _ := strings.Cut(rest, "=")
			d.env[k] = v
		case "RUN":
			if args, ok := strings.CutPrefix(rest, "go build "); ok {
				d.buildArgs = strings.Fields(args)
			}
		case "COPY":
			if !final {
				continue
			}
			for _, w := range strings.Fields(rest) {
				if strings.HasPrefix(w, "--") {
					d.copyFlags = append(d.copyFlags, w)
				} else {
					d.copySrcs = append(d.copySrcs, w)
				}
			}
			d.copyDst = d.copySrcs[len(d.copySrcs)-1]
			d.copySrcs = d.copySrcs[:len(d.copySrcs)-1]
		case "LABEL":
			for _, kv := range splitLabels(t, rest) {
				k, v, _ := strings.Cut(kv, "=")
				d.labels[k] = v
			}
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(rest), &d.entrypoint); err != nil {
				t.Fatalf("ENTRYPOINT %s: want the exec (JSON) form: %v", rest, err)
			}
		}
	}
	if stages != 2 {
		t.Fatalf("the Dockerfile has %d stages, want 2 (build, final)", stages)
	}
	return d
}

// splitLabels splits `k="v w" k2=v2` into k=v w, k2=v2.
func splitLabels(t *testing.T, s string) []string {
	var out []string
	var cur strings.Builder
	quoted := false
	for _, r := range s + " " {
		switch {
		case r == '"':
			quoted = !quoted
		case r == ' ' && !quoted:
			if cur.Len() > 0 {
				out = append(out, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteRune(r)
		}
	}
	if quoted {
		t.Fatalf("LABEL %s: unbalanced quotes", s)
	}
	return out
}

// TestDockerfileMatchesImage: the Dockerfile and the archive `make image`
// writes describe the same image, so neither drifts: the final stage is
// empty (scratch); it copies exactly the archive's binaries to the
// archive's directory, executable; ENTRYPOINT and LABELs are the archive
// config's; the build stage builds the same packages with the same flags,
// CGO off, with the Go release go.mod asks for.
func TestDockerfileMatchesImage(t *testing.T) {
	archive, _ := builtArchive(t)
	tag, err := name.NewTag(testTag)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(archive, &tag)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	files := imageFiles(t, img)
	d := parseDockerfile(t, filepath.Join("..", "..", "Dockerfile"))

	if d.final != "scratch" {
		t.Errorf("final stage FROM %s, want scratch (the archive has no base layers)", d.final)
	}
	var copied []string
	for _, s := range d.copySrcs {
		copied = append(copied, path.Join(strings.Trim(d.copyDst, "/"), path.Base(s)))
	}
	var inImage []string
	for k, lf := range files {
		if lf.hdr.Typeflag == tar.TypeReg {
			inImage = append(inImage, k)
		}
	}
	slices.Sort(copied)
	slices.Sort(inImage)
	if !slices.Equal(copied, inImage) {
		t.Errorf("the Dockerfile copies %v, the archive holds %v", copied, inImage)
	}
	if !strings.HasSuffix(d.copyDst, "/") {
		t.Errorf("COPY destination %q: want a directory (trailing /)", d.copyDst)
	}
	if !slices.Contains(d.copyFlags, "--chmod=0755") {
		t.Errorf("COPY flags %v: want --chmod=0755, the archive's mode", d.copyFlags)
	}
	if !slices.Equal(d.entrypoint, cf.Config.Entrypoint) {
		t.Errorf("Dockerfile ENTRYPOINT %q, archive %q", d.entrypoint, cf.Config.Entrypoint)
	}
	if !reflect.DeepEqual(d.labels, cf.Config.Labels) {
		t.Errorf("Dockerfile LABELs %v, archive %v", d.labels, cf.Config.Labels)
	}
	if d.env["CGO_ENABLED"] != spec.CGOEnabled {
		t.Errorf("Dockerfile CGO_ENABLED=%q, hack/image builds with %q", d.env["CGO_ENABLED"], spec.CGOEnabled)
	}
	var flags, pkgs []string
	for i := 0; i < len(d.buildArgs); i++ {
		a := d.buildArgs[i]
		switch {
		case a == "-o":
			i++
		case strings.HasPrefix(a, "-"):
			flags = append(flags, a)
		default:
			pkgs = append(pkgs, a)
		}
	}
	if !slices.Equal(flags, spec.BuildFlags) {
		t.Errorf("Dockerfile go build flags %v, hack/image %v", flags, spec.BuildFlags)
	}
	if !slices.Equal(pkgs, spec.Packages) {
		t.Errorf("Dockerfile builds %v, hack/image %v", pkgs, spec.Packages)
	}

	// The builder's Go is the release go.mod asks for.
	b, err := os.ReadFile(filepath.Join("..", "..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	var goVersion string
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "go "); ok {
			goVersion = strings.TrimSpace(v)
		}
	}
	parts := strings.SplitN(goVersion, ".", 3)
	if len(parts) < 2 {
		t.Fatalf("go.mod: go directive %q", goVersion)
	}
	if want := strings.Join(parts[:2], "."); d.goVersion != want {
		t.Errorf("Dockerfile GO_VERSION %q, go.mod's go directive %s wants %s", d.goVersion, goVersion, want)
	}
}
