package endpoint

import (
	"reflect"
	"testing"
)

// TestStatsSnapshotAddsEveryField: Add sums every counter, so that a field
// added later cannot be forgotten there.
func TestStatsSnapshotAddsEveryField(t *testing.T) {
	var s StatsSnapshot
	v := reflect.ValueOf(&s).Elem()
	for i := range v.NumField() {
		v.Field(i).SetUint(uint64(i + 1))
	}
	sum := reflect.ValueOf(s.Add(s))
	for i := range sum.NumField() {
		if got, want := sum.Field(i).Uint(), 2*uint64(i+1); got != want {
			t.Errorf("%s: Add gives %d, want %d", sum.Type().Field(i).Name, got, want)
		}
	}
}
