package cni

import (
	"errors"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// FuzzParseConfig feeds arbitrary bytes (the plugin's stdin, written by
// whoever writes the conflist) to ParseConfig and the per-pod kind
// resolution. It must never panic; an error is always a *types.Error with a
// specification code; an accepted config is valid and resolves to a known
// kind.
func FuzzParseConfig(f *testing.F) {
	for _, tc := range configCases {
		f.Add([]byte(tc.conf), "")
	}
	f.Add([]byte(`{"name":"p","args":{"cni":{"kind":"shm"}}}`), "IgnoreUnknown=1;SHM_CNI_KIND=tap")
	f.Add([]byte(`{"name":"p","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"shm-cni.io/kind":"shm"}}}`), "K8S_POD_NAME=x")
	f.Add([]byte(`{"name":"p","runtimeConfig":{"bandwidth":{"ingressRate":1000000,"ingressBurst":4294967295,"egressRate":-1}}}`), "")
	f.Add([]byte(`{"name":"p","runtimeConfig":{"bandwidth":{"egressRate":1e3,"egressBurst":8}}}`), "")
	f.Fuzz(func(t *testing.T, data []byte, cniArgs string) {
		c, err := ParseConfig(data)
		if err != nil {
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("error %v is a %T, not a *types.Error", err, err)
			}
			switch te.Code {
			case agentapi.CodeDecodingFailure, agentapi.CodeInvalidConfig, agentapi.CodeUnsupportedField:
			default:
				t.Fatalf("code %d for %q: %v", te.Code, data, err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("accepted config %q does not validate: %v", data, err)
		}
		if err := c.Queue.Validate(); err != nil {
			t.Fatalf("accepted queue sizes %+v: %v", c.Queue, err)
		}
		// The bandwidth capability: refused with code 7, or valid.
		if bw, err := c.PodBandwidth(); err != nil {
			if codeOf(err) != agentapi.CodeInvalidConfig {
				t.Fatalf("bandwidth: code %d: %v", codeOf(err), err)
			}
		} else if bw != nil && (bw.IsZero() || bw.Validate() != nil) {
			t.Fatalf("bandwidth %+v accepted", *bw)
		}
		a, err := ParsePodArgs(cniArgs)
		if err != nil {
			if codeOf(err) != agentapi.CodeInvalidEnvironment {
				t.Fatalf("CNI_ARGS %q: code %d: %v", cniArgs, codeOf(err), err)
			}
			return
		}
		kind, err := c.PodKind(a)
		if err != nil {
			if codeOf(err) != agentapi.CodeInvalidConfig {
				t.Fatalf("kind: code %d: %v", codeOf(err), err)
			}
			return
		}
		if kind != KindTap && kind != KindShm {
			t.Fatalf("kind %q accepted", kind)
		}
	})
}
