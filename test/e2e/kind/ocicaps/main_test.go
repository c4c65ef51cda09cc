package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestSpecOf: the file of a create, run or exec call, as runc reads it.
func TestSpecOf(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args   []string
		want   string
		wantOK bool
	}{
		{[]string{"--root", "/r", "create", "--bundle", "/b", "id"}, "/b/config.json", true},
		{[]string{"create", "-b", "/b", "id"}, "/b/config.json", true},
		{[]string{"--log", "/l", "run", "--bundle=/b", "id"}, "/b/config.json", true},
		{[]string{"create", "id"}, filepath.Join(wd, "config.json"), true},
		{[]string{"exec", "--process", "/p.json", "--detach", "id"}, "/p.json", true},
		{[]string{"exec", "-p=/p.json", "id"}, "/p.json", true},
		{[]string{"exec", "id", "sh"}, "", false},
		{[]string{"start", "id"}, "", false},
		{[]string{"delete", "--force", "id"}, "", false},
	} {
		got, ok := specOf(c.args)
		if got != c.want || ok != c.wantOK {
			t.Errorf("specOf(%q) = %q, %v, want %q, %v", c.args, got, ok, c.want, c.wantOK)
		}
	}
}

// TestTrimCaps: a capability the bounding set lacks leaves every set of a
// config.json and of a process.json; the others stay, in order.
func TestTrimCaps(t *testing.T) {
	have, err := boundingSet()
	if err != nil {
		t.Fatal(err)
	}
	missing := ""
	for name, n := range capNumbers {
		if have&(1<<n) == 0 {
			missing = name
			break
		}
	}
	if missing == "" {
		t.Skip("this process's bounding set lacks no known capability")
	}
	caps := []string{"CAP_CHOWN", missing, "CAP_KILL"}
	want := []string{"CAP_CHOWN", "CAP_KILL"}
	for name, doc := range map[string]map[string]any{
		"config.json":  {"ociVersion": "1.0.2", "process": map[string]any{"capabilities": map[string]any{"bounding": caps, "effective": caps}}},
		"process.json": {"capabilities": map[string]any{"bounding": caps, "permitted": caps}},
	} {
		f := filepath.Join(t.TempDir(), name)
		b, _ := json.Marshal(doc)
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := trimCaps(f); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		p := got
		if pp, ok := got["process"].(map[string]any); ok {
			p = pp
		}
		for set, v := range p["capabilities"].(map[string]any) {
			var l []string
			for _, c := range v.([]any) {
				l = append(l, c.(string))
			}
			if !slices.Equal(l, want) {
				t.Errorf("%s: %s = %q, want %q", name, set, l, want)
			}
		}
	}
}
