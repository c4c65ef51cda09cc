package router

import (
	"reflect"
	"testing"
)

// TestLinkStatsAddsEveryField: Add sums every counter, Filtered's too, so
// that a field added later cannot be forgotten there.
func TestLinkStatsAddsEveryField(t *testing.T) {
	var s LinkStats
	n := uint64(0)
	var fill func(v reflect.Value)
	fill = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.Uint64:
			n++
			v.SetUint(n)
		case reflect.Array:
			for i := range v.Len() {
				fill(v.Index(i))
			}
		}
	}
	v := reflect.ValueOf(&s).Elem()
	for i := range v.NumField() {
		fill(v.Field(i))
	}
	sum := s.Add(s)
	var check func(name string, got, orig reflect.Value)
	check = func(name string, got, orig reflect.Value) {
		switch got.Kind() {
		case reflect.Uint64:
			if got.Uint() != 2*orig.Uint() {
				t.Errorf("%s: Add gives %d, want %d", name, got.Uint(), 2*orig.Uint())
			}
		case reflect.Array:
			for i := range got.Len() {
				check(name, got.Index(i), orig.Index(i))
			}
		}
	}
	sv := reflect.ValueOf(sum)
	for i := range sv.NumField() {
		check(sv.Type().Field(i).Name, sv.Field(i), v.Field(i))
	}
}
