// Command checklocks is gVisor's lock analyzer (gvisor.dev/gvisor/tools/checklocks)
// as a go vet tool: make lint builds it and runs
//
//	go vet -vettool=bin/checklocks -inferred=false -wrappers=false ./...
//
// so that every +checklocks annotation in the tree is checked. It lives in
// a module of its own so that the analyzer's dependencies
// (golang.org/x/tools) stay out of the product's go.mod; its gVisor
// version must be the product's (make lint compares them).
//
// -inferred=false: fields without an annotation are not reported (the
// analyzer would suggest one for every field a mutex happens to guard).
// -wrappers=false: reports without a source position are dropped (the
// analyzer's own switch for them). Without it, a function literal called
// while a lock is held is reported at its implicit return for holding the
// caller's lock ("-: return with unexpected locks held"): the analyzer
// checks it with the caller's locks but expects none held on exit.
package main

import (
	"golang.org/x/tools/go/analysis/singlechecker"
	"gvisor.dev/gvisor/tools/checklocks"
)

func main() { singlechecker.Main(checklocks.Analyzer) }
