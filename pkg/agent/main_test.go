package agent

import (
	"os"
	"testing"
)

// TestMain removes the binaries builtBinaries made.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}
