package endpoint

import (
	"math"
	"strings"
	"testing"
	"time"
)

func TestRxLimitValidate(t *testing.T) {
	for _, tc := range []struct {
		l    RxLimit
		want string // "" means valid
	}{
		{RxLimit{}, ""},
		{RxLimit{PacketsPerSecond: MinRxPacketsPerSecond}, ""},
		{RxLimit{BytesPerSecond: 1e9, Burst: time.Second}, ""},
		{RxLimit{PacketsPerSecond: -1}, "packets per second"},
		{RxLimit{PacketsPerSecond: MinRxPacketsPerSecond - 1}, "packets per second"},
		{RxLimit{PacketsPerSecond: math.NaN()}, "packets per second"},
		{RxLimit{BytesPerSecond: math.Inf(1)}, "bytes per second"},
		{RxLimit{BytesPerSecond: 1000}, "bytes per second"},
		{RxLimit{PacketsPerSecond: 5000, Burst: -time.Millisecond}, "burst"},
	} {
		err := tc.l.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v", tc.l, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: error %v, want one naming %q", tc.l, err, tc.want)
		}
	}
}
