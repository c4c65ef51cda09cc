package cni

import (
	"fmt"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// newError returns a *types.Error with a formatted message.
func newError(code uint, format string, args ...any) *types.Error {
	return types.NewError(code, fmt.Sprintf(format, args...), "")
}

// toCNI turns any error into the *types.Error the runtime gets: a code
// anywhere in err's chain (*types.Error, *agentapi.Error) is kept, anything
// else becomes agentapi.CodeInternal. err must not be nil.
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
