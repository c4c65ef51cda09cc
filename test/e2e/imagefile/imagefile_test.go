package imagefile

import "testing"

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		arg  string
		want Spec
		ok   bool
	}{
		{"bin/x:/usr/bin/x", Spec{Host: "bin/x", Path: "/usr/bin/x", Mode: 0o755, Image: "usr/bin/x"}, true},
		{"a:/etc/a:644", Spec{Host: "a", Path: "/etc/a", Mode: 0o644, Image: "etc/a"}, true},
		{"a", Spec{}, false},
		{"a:etc/a", Spec{}, false},
		{"a:/etc/a:9", Spec{}, false},
		{"a:/b:644:x", Spec{}, false},
	} {
		got, err := Parse(tc.arg)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v, ok %v", tc.arg, got, err, tc.want, tc.ok)
		}
	}
}
