package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoNetstack: the CNI binary links no gVisor package. It only makes
// devices and talks to the agent, so it stays small and fast to exec; a
// gVisor import (the netstack came in through pkg/endpoint once) fails
// here.
func TestNoNetstack(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("skipping: no go tool on PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "gvisor.dev/") {
			t.Errorf("the CNI binary imports %s", p)
		}
	}
}
