//go:build !race

package e2e

// raceTest is set when the test binary is built with the race detector.
const raceTest = false
