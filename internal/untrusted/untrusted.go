// Package untrusted holds helpers for values that come from outside the
// process (a peer's message, a conflist) and end up in errors and logs.
package untrusted

import "strconv"

// maxQuote is how much of a value Quote keeps.
const maxQuote = 64

// Quote quotes s for an error message, cut to 64 bytes so that a hostile
// value cannot blow up logs.
func Quote(s string) string {
	if len(s) > maxQuote {
		return strconv.Quote(s[:maxQuote]) + "..."
	}
	return strconv.Quote(s)
}
