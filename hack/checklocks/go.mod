module github.com/shm-cni/shm-cni/hack/checklocks

go 1.26.3

require (
	golang.org/x/tools v0.43.0
	gvisor.dev/gvisor v0.0.0-20260905035102-160fafc42237
)

require (
	golang.org/x/mod v0.34.0 // indirect
	golang.org/x/sync v0.20.0 // indirect
)
