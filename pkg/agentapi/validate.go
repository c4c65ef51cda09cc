package agentapi

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"unicode"

	"github.com/shm-cni/shm-cni/internal/untrusted"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// maxNameLen bounds free-form names (pod name, namespace): a Kubernetes
// DNS-1123 subdomain is at most 253 bytes.
const maxNameLen = 253

// cniName is the CNI library's rule for container IDs and network names.
var cniName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// problems collects validation failures, each naming its field.
type problems []string

func (p *problems) add(field, format string, args ...any) {
	*p = append(*p, field+": "+fmt.Sprintf(format, args...))
}

// Validate checks r's fields and returns nil or an *Error with
// CodeInvalidConfig listing every problem, each naming its field (for
// example `attach.ifName: ...`). It does not check Version: DecodeRequest
// does that first.
func (r *Request) Validate() error {
	var p problems
	bodies := []struct {
		op  string
		set bool
	}{
		{OpAttach, r.Attach != nil},
		{OpDetach, r.Detach != nil},
		{OpCheck, r.Check != nil},
		{OpGC, r.GC != nil},
	}
	switch r.Op {
	case OpAttach:
		if r.Attach == nil {
			p.add("attach", "required for op %q", r.Op)
		} else {
			r.Attach.validate(&p)
		}
	case OpDetach:
		if r.Detach == nil {
			p.add("detach", "required for op %q", r.Op)
		} else {
			validateID(&p, "detach", r.Detach.ContainerID, r.Detach.IfName)
		}
	case OpCheck:
		if r.Check == nil {
			p.add("check", "required for op %q", r.Op)
		} else {
			validateID(&p, "check", r.Check.ContainerID, r.Check.IfName)
			validateIPs(&p, "check.ips", r.Check.IPs)
			validateBandwidth(&p, "check.bandwidth", r.Check.Bandwidth)
		}
	case OpGC:
		if r.GC == nil {
			p.add("gc", "required for op %q", r.Op)
		} else {
			for i, a := range r.GC.Valid {
				validateID(&p, fmt.Sprintf("gc.valid[%d]", i), a.ContainerID, a.IfName)
			}
		}
	case OpStatus:
	case "":
		p.add("op", "required")
	default:
		p.add("op", "%s is not one of %s, %s, %s, %s, %s", untrusted.Quote(r.Op), OpAttach, OpDetach, OpCheck, OpStatus, OpGC)
	}
	for _, b := range bodies {
		if b.set && b.op != r.Op {
			p.add(b.op, "not allowed for op %s", untrusted.Quote(r.Op))
		}
	}
	if len(p) == 0 {
		return nil
	}
	return &Error{Code: CodeInvalidConfig, Msg: "invalid request", Details: strings.Join(p, "; ")}
}

// WantFDs returns how many FDs an attach of a's Kind carries, or -1 for an
// unknown kind.
func (a *AttachRequest) WantFDs() int {
	switch a.Kind {
	case KindShm:
		return ShmFDs
	case KindTap:
		return TapFDs
	case KindVeth:
		return 0
	}
	return -1
}

// ValidateFDs checks that n, the number of FDs that came with r, is what r's
// Op and Kind need: ShmFDs for a shm attach, TapFDs for a tap attach, none
// otherwise. It returns nil or an *Error with CodeInvalidConfig. r must
// have passed Validate.
func (r *Request) ValidateFDs(n int) error {
	want := 0
	what := "op " + untrusted.Quote(r.Op)
	if r.Op == OpAttach && r.Attach != nil {
		want = r.Attach.WantFDs()
		what = "attach kind " + untrusted.Quote(r.Attach.Kind)
	}
	if n == want {
		return nil
	}
	return &Error{
		Code:    CodeInvalidConfig,
		Msg:     "wrong number of file descriptors",
		Details: fmt.Sprintf("%s needs %d file descriptors, got %d", what, want, n),
	}
}

func (a *AttachRequest) validate(p *problems) {
	validateID(p, "attach", a.ContainerID, a.IfName)
	switch {
	case a.Netns == "":
		p.add("attach.netns", "required")
	case !filepath.IsAbs(a.Netns) || strings.ContainsRune(a.Netns, 0):
		p.add("attach.netns", "%s is not an absolute path", untrusted.Quote(a.Netns))
	}
	switch {
	case a.Network == "":
		p.add("attach.network", "required")
	case !cniName.MatchString(a.Network):
		p.add("attach.network", "%s must match %s", untrusted.Quote(a.Network), cniName)
	}
	switch a.Kind {
	case KindShm:
		if a.Queue == nil {
			p.add("attach.queue", "required for kind %s", KindShm)
		} else {
			if a.Queue.DataSize == 0 {
				p.add("attach.queue.dataSize", "required")
			}
			if a.Queue.PipeSize == 0 {
				p.add("attach.queue.pipeSize", "required")
			}
			if a.Queue.BufferSize == 0 {
				p.add("attach.queue.bufferSize", "required")
			}
		}
	case KindTap, KindVeth:
		if a.Queue != nil {
			p.add("attach.queue", "only for kind %s", KindShm)
		}
	case "":
		p.add("attach.kind", "required")
	default:
		p.add("attach.kind", "%s is not one of %s, %s, %s", untrusted.Quote(a.Kind), KindShm, KindTap, KindVeth)
	}
	if err := linkspec.CheckMTU(a.MTU, linkspec.MinMTU); a.MTU != 0 && err != nil {
		p.add("attach.mtu", "%v (or 0, the default)", err)
	}
	validateIPs(p, "attach.ips", a.IPs)
	validateName(p, "attach.podNamespace", a.PodNamespace)
	validateName(p, "attach.podName", a.PodName)
	if a.MAC != "" {
		hw, err := net.ParseMAC(a.MAC)
		switch {
		case err != nil || len(hw) != 6:
			p.add("attach.mac", "%s is not a 6-byte MAC address", untrusted.Quote(a.MAC))
		case hw[0]&1 != 0:
			p.add("attach.mac", "%s is a multicast address", untrusted.Quote(a.MAC))
		case string(hw) == "\x00\x00\x00\x00\x00\x00":
			p.add("attach.mac", "%s is all zeroes", untrusted.Quote(a.MAC))
		}
	}
	validateBandwidth(p, "attach.bandwidth", a.Bandwidth)
}

// validateBandwidth checks an optional bandwidth limit, naming each field
// under prefix.
func validateBandwidth(p *problems, prefix string, bw *linkspec.Bandwidth) {
	if bw == nil {
		return
	}
	if err := bw.Validate(); err != nil {
		for _, e := range unjoin(err) {
			*p = append(*p, prefix+"."+e.Error())
		}
	}
}

// unjoin returns the errors an errors.Join joined, or err alone.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// validateID checks a container ID and interface name as the CNI library
// does.
func validateID(p *problems, prefix, containerID, ifName string) {
	switch {
	case containerID == "":
		p.add(prefix+".containerID", "required")
	case !cniName.MatchString(containerID):
		p.add(prefix+".containerID", "%s must match %s", untrusted.Quote(containerID), cniName)
	}
	if linkspec.CheckIfName(ifName) != nil {
		p.add(prefix+".ifName", "%s must be 1..%d bytes, no '/', ':' or whitespace, not \".\" or \"..\"", untrusted.Quote(ifName), linkspec.MaxIfNameLen)
	}
}

// validateIPs checks that every entry is a CIDR ("10.1.2.3/24") and that no
// address repeats.
func validateIPs(p *problems, field string, ips []string) {
	seen := make(map[netip.Addr]int, len(ips))
	for i, s := range ips {
		f := fmt.Sprintf("%s[%d]", field, i)
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			p.add(f, "%s is not a CIDR", untrusted.Quote(s))
			continue
		}
		if j, dup := seen[pfx.Addr()]; dup {
			p.add(f, "%s repeats the address of %s[%d]", untrusted.Quote(s), field, j)
			continue
		}
		seen[pfx.Addr()] = i
	}
}

// validateName checks an optional free-form name: bounded, printable, no '/'.
func validateName(p *problems, field, s string) {
	if len(s) > maxNameLen {
		p.add(field, "longer than %d bytes", maxNameLen)
		return
	}
	for _, r := range s {
		if r == '/' || !unicode.IsPrint(r) || unicode.IsSpace(r) {
			p.add(field, "%s has a '/', space or unprintable character", untrusted.Quote(s))
			return
		}
	}
}
