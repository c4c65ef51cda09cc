// Command ocicaps is an OCI runtime that hands every call to runc after
// removing, from the bundle's config.json at create or run and from the
// process.json of an exec, the capabilities the calling process's bounding
// set lacks.
//
// Where a machine's init drops a capability from every process (the
// project's machines drop CAP_SYS_RESOURCE), runc fails a privileged
// container ("unable to apply caps: operation not permitted"), because
// docker run --privileged asks for every capability it knows. The kind tier
// gives its dockerd this runtime as the default (--add-runtime
// ocicaps=PATH --default-runtime ocicaps), so privileged kind nodes start
// with the capabilities the machine has.
//
// RUNC names runc (default: runc in PATH).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

func main() { os.Exit(run()) }

func run() int {
	runc := os.Getenv("RUNC")
	if runc == "" {
		var err error
		if runc, err = exec.LookPath("runc"); err != nil {
			fmt.Fprintf(os.Stderr, "ocicaps: %v\n", err)
			return 1
		}
	}
	if file, ok := specOf(os.Args[1:]); ok {
		if err := trimCaps(file); err != nil {
			fmt.Fprintf(os.Stderr, "ocicaps: %v\n", err)
			return 1
		}
	}
	args := append([]string{runc}, os.Args[1:]...)
	err := syscall.Exec(runc, args, os.Environ())
	fmt.Fprintf(os.Stderr, "ocicaps: exec %s: %v\n", runc, err)
	return 1
}

// specOf returns the file holding the capabilities of a call: the
// config.json of a create or run call's bundle (its --bundle or -b flag, or
// the working directory, as runc defaults), or an exec call's --process
// (-p) file.
func specOf(args []string) (string, bool) {
	cmd := -1
	for i, a := range args {
		if a == "create" || a == "run" || a == "exec" {
			cmd = i
			break
		}
	}
	if cmd < 0 {
		return "", false
	}
	long, short, base := "--bundle", "-b", "config.json"
	if args[cmd] == "exec" {
		long, short, base = "--process", "-p", ""
	}
	for i := cmd + 1; i < len(args); i++ {
		a := args[i]
		v, ok := "", false
		switch {
		case a == long || a == short:
			if i+1 < len(args) {
				v, ok = args[i+1], true
			}
		case strings.HasPrefix(a, long+"="):
			v, ok = strings.TrimPrefix(a, long+"="), true
		case strings.HasPrefix(a, short+"="):
			v, ok = strings.TrimPrefix(a, short+"="), true
		}
		if ok {
			return filepath.Join(v, base), true
		}
	}
	if base == "" { // an exec with its process on the command line
		return "", false
	}
	wd, err := os.Getwd()
	return filepath.Join(wd, base), err == nil
}

// trimCaps rewrites the config's capability sets without the capabilities
// this process's bounding set lacks; a config asking for none of those is
// left as it is.
func trimCaps(file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var spec map[string]any
	if err := json.Unmarshal(b, &spec); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	// A config.json holds a process; a process.json is one.
	process, _ := spec["process"].(map[string]any)
	if process == nil {
		process = spec
	}
	caps, _ := process["capabilities"].(map[string]any)
	if caps == nil {
		return nil
	}
	have, err := boundingSet()
	if err != nil {
		return err
	}
	changed := false
	for set, v := range caps {
		list, _ := v.([]any)
		kept := list[:0:0]
		for _, c := range list {
			name, _ := c.(string)
			if n, known := capNumbers[name]; known && have&(1<<n) == 0 {
				changed = true
				continue
			}
			kept = append(kept, c)
		}
		caps[set] = kept
	}
	if !changed {
		return nil
	}
	out, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	tmp := file + ".ocicaps"
	if err := os.WriteFile(tmp, out, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// boundingSet reads CapBnd of this process.
func boundingSet() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapBnd:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapBnd in /proc/self/status")
}

// capNumbers are the capabilities by name (linux/capability.h).
var capNumbers = map[string]uint{
	"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
	"CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
	"CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
	"CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
	"CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
	"CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
	"CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
	"CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
	"CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
