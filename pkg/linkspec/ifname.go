package linkspec

import (
	"errors"
	"fmt"
	"unicode"
)

// MaxIfNameLen is the longest interface name Linux accepts: IFNAMSIZ (16)
// less the terminating NUL.
const MaxIfNameLen = 15

// CheckIfName accepts what the kernel's dev_valid_name accepts: 1 to
// MaxIfNameLen bytes, not "." or "..", no '/', ':', white space or NUL.
func CheckIfName(name string) error {
	switch {
	case name == "":
		return errors.New("empty")
	case len(name) > MaxIfNameLen:
		return fmt.Errorf("longer than %d bytes", MaxIfNameLen)
	case name == "." || name == "..":
		return errors.New("reserved name")
	}
	for _, r := range name {
		if r == '/' || r == ':' || r == 0 || unicode.IsSpace(r) {
			return errors.New("contains '/', ':', white space or NUL")
		}
	}
	return nil
}
