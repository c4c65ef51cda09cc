// Package imagefile parses the file arguments of the test image builders
// (test/e2e/cri/mkimage, test/e2e/kind/mkimages): HOSTPATH:/IMAGEPATH[:MODE].
package imagefile

import (
	"fmt"
	"path"
	"strconv"
	"strings"
)

// Spec is a file to put into an image.
type Spec struct {
	Host  string // the file on this machine
	Path  string // its absolute path in the image
	Mode  int64  // its mode in the image: 0755 unless given (octal)
	Image string // Path without its leading slash, as a tar entry's name
}

// Parse parses arg, HOSTPATH:/IMAGEPATH[:MODE].
func Parse(arg string) (Spec, error) {
	f := strings.Split(arg, ":")
	if len(f) < 2 || len(f) > 3 || !path.IsAbs(f[1]) {
		return Spec{}, fmt.Errorf("file %q: want HOSTPATH:/IMAGEPATH[:MODE]", arg)
	}
	s := Spec{Host: f[0], Path: f[1], Mode: 0o755, Image: f[1][1:]}
	if len(f) == 3 {
		m, err := strconv.ParseInt(f[2], 8, 32)
		if err != nil {
			return Spec{}, fmt.Errorf("file %q: mode: %w", arg, err)
		}
		s.Mode = m
	}
	return s, nil
}
