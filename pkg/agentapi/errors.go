package agentapi

import (
	"errors"

	"github.com/containernetworking/cni/pkg/types"
)

// Error codes: every CNI error code shm-cni reports, from the agent (in
// Error.Code) or from the CNI plugin itself. The first group are the CNI
// specification's well-known codes; shm-cni's own start at 100 as the
// specification reserves lower ones: the agent's at 100, the plugin's at
// 120.
const (
	// CodeIncompatibleVersion: the config's cniVersion is not supported
	// (reported by the CNI library's skel before the plugin runs).
	CodeIncompatibleVersion uint = types.ErrIncompatibleCNIVersion // 1
	// CodeUnsupportedField: a key or value that is not supported: a
	// request field this agent does not know, an unknown key inside the
	// config's "queue".
	CodeUnsupportedField uint = types.ErrUnsupportedField // 2
	// CodeInvalidEnvironment: a CNI_* variable is missing or invalid
	// (CNI_NETNS that is no network namespace, a malformed CNI_ARGS).
	CodeInvalidEnvironment uint = types.ErrInvalidEnvironmentVariables // 4
	// CodeDecodingFailure: a message, the config or its prevResult is not
	// valid JSON or is truncated.
	CodeDecodingFailure uint = types.ErrDecodingFailure // 6
	// CodeInvalidConfig: a request field, the FD count, a config field or
	// a per-pod override has an invalid value.
	CodeInvalidConfig uint = types.ErrInvalidNetworkConfig // 7
	// CodeInvalidNetNS: CNI_NETNS is the plugin's own network namespace.
	CodeInvalidNetNS uint = types.ErrInvalidNetNS // 8
	// CodeTryAgainLater: the agent is not running or did not answer.
	CodeTryAgainLater uint = types.ErrTryAgainLater // 11
	// CodeNotAvailable: the agent is unreachable or not ready (STATUS).
	CodeNotAvailable uint = types.ErrPluginNotAvailable // 50

	// CodeInternal: a failure without a more specific code (in the agent,
	// also a handler panic).
	CodeInternal uint = 100
	// CodeAttachFailed: the agent could not attach the link.
	CodeAttachFailed uint = 101
	// CodeNoSuchAttachment: no attachment for the container and interface.
	CodeNoSuchAttachment uint = 102
	// CodeAddressExhausted: no free address in the node's pod CIDRs.
	CodeAddressExhausted uint = 103
	// CodeVersionMismatch: the request's protocol version is not Version.
	CodeVersionMismatch uint = 104
	// CodePermissionDenied: the peer's uid may not use the agent socket.
	CodePermissionDenied uint = 105

	// CodeLinkSetup: the plugin could not create or configure the pod's
	// interface in its network namespace.
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

// Error is an error with a CNI error code. It travels in Response.Error and
// is what Call returns for every failure, so the CNI binary can hand it to
// the runtime with ToCNI.
type Error struct {
	Code    uint   `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details,omitempty"`

	// cause is the local error behind a client-side failure (for example
	// context.DeadlineExceeded); it never travels on the wire.
	cause error
}

var _ error = (*Error)(nil)

// NewError returns an Error with the given code, message and details.
func NewError(code uint, msg, details string) *Error {
	return &Error{Code: code, Msg: msg, Details: details}
}

// Error implements error.Error in the format of the CNI library's
// types.Error: the message, then "; " and the details if there are any.
func (e *Error) Error() string {
	if e.Details == "" {
		return e.Msg
	}
	return e.Msg + "; " + e.Details
}

// Unwrap returns the local cause of a client-side failure, or nil.
func (e *Error) Unwrap() error { return e.cause }

// CNI returns e as the CNI library's error type.
func (e *Error) CNI() *types.Error {
	return types.NewError(e.Code, e.Msg, e.Details)
}

// ToCNI turns any error into the CNI library's error type: an *Error (or a
// *types.Error) anywhere in err's chain keeps its code, with err's full text
// as the message when it was wrapped; any other error gets CodeInternal.
// ToCNI(nil) is nil.
func ToCNI(err error) *types.Error {
	if err == nil {
		return nil
	}
	return asError(err).CNI()
}

// asError returns err as an *Error, keeping the code of an *Error or
// *types.Error in its chain and CodeInternal otherwise.
func asError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		if e == nil {
			// A typed nil returned as error: a bug, never a success.
			return &Error{Code: CodeInternal, Msg: "nil *agentapi.Error used as an error", cause: err}
		}
		if e == err {
			return e
		}
		return &Error{Code: e.Code, Msg: err.Error(), cause: err}
	}
	var te *types.Error
	if errors.As(err, &te) {
		if error(te) == err {
			return &Error{Code: te.Code, Msg: te.Msg, Details: te.Details}
		}
		return &Error{Code: te.Code, Msg: err.Error(), cause: err}
	}
	return &Error{Code: CodeInternal, Msg: err.Error(), cause: err}
}
