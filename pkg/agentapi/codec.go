package agentapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// DecodeRequest parses one request record from an untrusted peer and
// validates it. It returns an *Error with
//   - CodeDecodingFailure when data is larger than MaxMessageSize, is not
//     one JSON object, or has trailing data;
//   - CodeVersionMismatch when the version is not Version (checked before
//     anything else, so a newer peer's new fields do not hide the cause);
//   - CodeUnsupportedField for a field this version does not know;
//   - CodeInvalidConfig when Validate fails.
//
// Keys are matched as encoding/json does: exactly, or else
// case-insensitively.
func DecodeRequest(data []byte) (*Request, error) {
	if len(data) > MaxMessageSize {
		return nil, tooLarge("request", len(data))
	}
	var probe struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, &Error{Code: CodeDecodingFailure, Msg: "cannot decode request", Details: err.Error()}
	}
	if probe.Version != Version {
		return nil, versionMismatch("request", probe.Version)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var req Request
	if err := dec.Decode(&req); err != nil {
		// encoding/json has no typed error for an unknown field.
		if strings.HasPrefix(err.Error(), "json: unknown field ") {
			return nil, &Error{Code: CodeUnsupportedField, Msg: "unsupported field in request", Details: err.Error()}
		}
		return nil, &Error{Code: CodeDecodingFailure, Msg: "cannot decode request", Details: err.Error()}
	}
	if err := expectEOF(dec); err != nil {
		return nil, &Error{Code: CodeDecodingFailure, Msg: "cannot decode request", Details: err.Error()}
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

// DecodeResponse parses the agent's answer to a request of op. Unknown
// fields are ignored (the agent is trusted and may be newer); the version
// must be Version, and a success must carry the body op needs. It returns
// an *Error on failure. A response that carries an Error is returned as is.
func DecodeResponse(data []byte, op string) (*Response, error) {
	if len(data) > MaxMessageSize {
		return nil, tooLarge("response", len(data))
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var resp Response
	if err := dec.Decode(&resp); err != nil {
		return nil, &Error{Code: CodeDecodingFailure, Msg: "cannot decode agent response", Details: err.Error()}
	}
	if err := expectEOF(dec); err != nil {
		return nil, &Error{Code: CodeDecodingFailure, Msg: "cannot decode agent response", Details: err.Error()}
	}
	if resp.Version != Version {
		return nil, versionMismatch("response", resp.Version)
	}
	if resp.Error == nil {
		if err := checkBody(op, &resp); err != nil {
			return nil, &Error{Code: CodeDecodingFailure, Msg: "incomplete agent response", Details: err.Error()}
		}
	}
	return &resp, nil
}

// checkBody reports a successful response that lacks the body op needs.
func checkBody(op string, resp *Response) error {
	missing := ""
	switch {
	case op == OpAttach && resp.Attach == nil:
		missing = "attach"
	case op == OpStatus && resp.Status == nil:
		missing = "status"
	case op == OpGC && resp.GC == nil:
		missing = "gc"
	}
	if missing != "" {
		return fmt.Errorf("response to %s has no %s body", op, missing)
	}
	return nil
}

// expectEOF reports data after the first JSON value.
func expectEOF(dec *json.Decoder) error {
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("data after the JSON object at offset %d", dec.InputOffset())
	}
	return nil
}

func tooLarge(what string, n int) *Error {
	return &Error{
		Code:    CodeDecodingFailure,
		Msg:     what + " too large",
		Details: fmt.Sprintf("%s is %d bytes, more than the limit of %d", what, n, MaxMessageSize),
	}
}

func versionMismatch(what string, got int) *Error {
	return &Error{
		Code:    CodeVersionMismatch,
		Msg:     "protocol version mismatch",
		Details: fmt.Sprintf("%s has version %d, this side speaks version %d", what, got, Version),
	}
}
