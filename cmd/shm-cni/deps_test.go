package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps: the CNI binary links only what ADD, DEL and CHECK need, so that
// it stays small and fast to exec; the runtime execs it once per pod and
// command. Each entry is a package prefix it must not import and why.
func TestDeps(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: no go tool on PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	forbidden := []struct{ prefix, why string }{
		// The netstack came in through pkg/endpoint once.
		{"gvisor.dev/", "the netstack: the binary only makes devices and talks to the agent"},
		// plugins/pkg/ipam only wraps the CNI library's invoke package,
		// which the plugin calls directly; the wrapper's other imports
		// ran their package init in every exec: 1.0 of 3.9 ms of package
		// init (GODEBUG=inittrace=1, median of 40), most of it knftables
		// compiling regular expressions.
		{"github.com/containernetworking/plugins/pkg/ipam", "IPAM delegation goes through the CNI library's invoke package"},
		{"github.com/containernetworking/plugins/pkg/ip", "host-side IP helpers the plugin does not use"},
		{"github.com/containernetworking/plugins/pkg/utils", "host-side helpers (sysctl, iptables) the plugin does not use"},
		{"sigs.k8s.io/knftables", "nftables: its package init compiles regular expressions"},
		{"github.com/coreos/go-iptables/", "iptables: the plugin programs no firewall"},
		{"github.com/safchain/ethtool", "ethtool: the plugin sets offloads through the TAP device"},
	}
	for _, p := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if p == f.prefix || strings.HasPrefix(p, strings.TrimSuffix(f.prefix, "/")+"/") {
				t.Errorf("the CNI binary imports %s (%s)", p, f.why)
			}
		}
	}
}
