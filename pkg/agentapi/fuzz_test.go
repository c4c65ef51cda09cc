package agentapi

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzDecodeRequest feeds arbitrary records to the server's parser. It must
// never panic; a failure is an *Error with one of the parser's codes; a
// success is a valid request that re-encodes to a stable form and whose
// FD count check accepts exactly the count its op and kind need.
func FuzzDecodeRequest(f *testing.F) {
	for _, tc := range decodeCases() {
		if len(tc.in) <= MaxMessageSize {
			f.Add([]byte(tc.in))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := DecodeRequest(data)
		if err != nil {
			e, ok := err.(*Error)
			if !ok {
				t.Fatalf("error %T %v is not *Error", err, err)
			}
			switch e.Code {
			case CodeDecodingFailure, CodeVersionMismatch, CodeUnsupportedField, CodeInvalidConfig:
			default:
				t.Fatalf("unexpected code %d: %v", e.Code, e)
			}
			if req != nil {
				t.Fatal("request returned with an error")
			}
			return
		}
		if err := req.Validate(); err != nil {
			t.Fatalf("decoded request does not validate: %v", err)
		}
		enc1, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		req2, err := DecodeRequest(enc1)
		if err != nil {
			t.Fatalf("re-encoded request %s fails: %v", enc1, err)
		}
		enc2, _ := json.Marshal(req2)
		if !bytes.Equal(enc1, enc2) {
			t.Fatalf("unstable encoding:\n%s\n%s", enc1, enc2)
		}
		want := 0
		if req.Op == OpAttach {
			want = req.Attach.WantFDs()
		}
		if want < 0 || want > MaxFDs {
			t.Fatalf("valid request wants %d fds", want)
		}
		if req.ValidateFDs(want) != nil || req.ValidateFDs(want+1) == nil {
			t.Fatalf("fd count check wrong for %s", enc1)
		}
	})
}
