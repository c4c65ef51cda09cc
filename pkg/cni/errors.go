package cni

import (
	"fmt"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// Error codes the plugin reports. The first group are the CNI
// specification's codes; the agent's own codes (agentapi.CodeInternal and up) pass
// through unchanged; the plugin's own codes start at 120, clear of them.
const (
	// CodeIncompatibleVersion: the config's cniVersion is not supported
	// (reported by the CNI library's skel before the plugin runs).
	CodeIncompatibleVersion uint = types.ErrIncompatibleCNIVersion // 1
	// CodeUnsupportedField: a key or value the plugin does not support,
	// for example an unknown key inside "queue".
	CodeUnsupportedField uint = types.ErrUnsupportedField // 2
	// CodeInvalidEnvironment: a CNI_* variable is missing or invalid
	// (CNI_NETNS that is no network namespace, a malformed CNI_ARGS).
	CodeInvalidEnvironment uint = types.ErrInvalidEnvironmentVariables // 4
	// CodeDecodingFailure: the config or its prevResult is not valid JSON.
	CodeDecodingFailure uint = types.ErrDecodingFailure // 6
	// CodeInvalidConfig: a config field (or per-pod override) has an
	// invalid value.
	CodeInvalidConfig uint = types.ErrInvalidNetworkConfig // 7
	// CodeInvalidNetNS: CNI_NETNS is the plugin's own network namespace.
	CodeInvalidNetNS uint = types.ErrInvalidNetNS // 8
	// CodeTryAgainLater: the agent is not running or did not answer.
	CodeTryAgainLater uint = types.ErrTryAgainLater // 11
	// CodeNotAvailable: STATUS found the agent unreachable or not ready.
	CodeNotAvailable uint = types.ErrPluginNotAvailable // 50

	// CodeInternal: a failure without a more specific code.
	CodeInternal uint = agentapi.CodeInternal // 100

	// CodeLinkSetup: creating or configuring the pod's interface in its
	// network namespace failed.
	CodeLinkSetup uint = 120
	// CodeInterfaceExists: ADD found CNI_IFNAME already present in the
	// pod's network namespace (the specification requires ADD to fail).
	CodeInterfaceExists uint = 121
	// CodeCheckFailed: CHECK found the interface, its addresses or routes
	// not as the previous result says.
	CodeCheckFailed uint = 122
	// CodeBadAgentAnswer: the agent's attach answer is unusable (an
	// address or MAC that does not parse).
	CodeBadAgentAnswer uint = 123
)

// newError returns a *types.Error with a formatted message.
func newError(code uint, format string, args ...any) *types.Error {
	return types.NewError(code, fmt.Sprintf(format, args...), "")
}

// toCNI turns any error into the *types.Error the runtime gets: a code
// anywhere in err's chain (*types.Error, *agentapi.Error) is kept, anything
// else becomes CodeInternal. err must not be nil.
func toCNI(err error) *types.Error {
	return agentapi.ToCNI(err)
}

// codeOf returns the CNI code toCNI would give err.
func codeOf(err error) uint {
	if err == nil {
		return 0
	}
	return agentapi.ToCNI(err).Code
}
