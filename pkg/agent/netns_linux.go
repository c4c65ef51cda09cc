package agent

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
)

// checkNetns returns an error wrapping errGone when path is no longer a
// network namespace (the pod is gone: deleted while the agent was down, or
// the node rebooted).
func checkNetns(path string) error {
	x, err := ns.GetNS(path)
	var notExist ns.NSPathNotExistErr
	var notNS ns.NSPathNotNSErr
	switch {
	case err == nil:
		return x.Close()
	case errors.As(err, &notExist), errors.As(err, &notNS):
		return fmt.Errorf("%w: netns %s: %v", errGone, path, err)
	}
	return fmt.Errorf("open netns %s: %w", path, err)
}
