package shm

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/shm-cni/shm-cni/pkg/queue"
)

// largeSizes suit a 64 KiB MTU: 2048 buffers of 2 KiB, 32 per frame.
var largeSizes = queue.Sizes{DataSize: 4 << 20, PipeSize: 256 << 10, BufferSize: 2048}

// TestTwoProcessTCP carries 1 GiB of verified TCP each way (a sixteenth
// under the race detector) between gVisor stacks in two processes, over our
// server and our client, at MTU 1500 and at a 64 KiB MTU.
func TestTwoProcessTCP(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mtu   uint32
		sizes queue.Sizes
	}{
		{"mtu1500", 1500, queue.DefaultSizes()},
		{"mtu65000", 65000, largeSizes},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runExchange(t, ours, ours, tc.mtu, tc.sizes, scaled(1<<30))
		})
	}
}

// TestInteropGVisorClient runs gVisor's own sharedmem client (sharedmem.New)
// in the child against our server.
func TestInteropGVisorClient(t *testing.T) {
	runExchange(t, ours, gvisor, 1500, queue.DefaultSizes(), scaled(64<<20))
}

// TestInteropGVisorClientLargeMTU is TestInteropGVisorClient at the agent's
// default MTU of sandbox links (65000, frames of 32 buffers each way), as
// runsc's Sentry drives its link with gVisor's client.
func TestInteropGVisorClientLargeMTU(t *testing.T) {
	runExchange(t, ours, gvisor, 65000, queue.DefaultSizes(), scaled(64<<20))
}

// TestInteropGVisorServer runs our client in the child against gVisor's own
// sharedmem server (sharedmem.NewServerEndpoint).
func TestInteropGVisorServer(t *testing.T) {
	runExchange(t, gvisor, ours, 1500, queue.DefaultSizes(), scaled(64<<20))
}

func runExchange(t *testing.T, serverImpl, clientImpl string, mtu uint32, sizes queue.Sizes, n int64) {
	tp := startTwoProcess(t, serverImpl, peerConfig{Impl: clientImpl, Mode: modeExchange, MTU: mtu, Bytes: n}, sizes)
	if os.Getenv("SHM_DEBUG") != "" {
		go func() {
			for {
				time.Sleep(2 * time.Second)
				if s, ok := tp.Link.(*Server); ok {
					fmt.Fprintf(os.Stderr, "server %+v\n", s.Stats().Snapshot())
				}
			}
		}()
	}
	if err := exchange(tp.Conn, n, 1, 2); err != nil {
		t.Fatalf("parent: %v", err)
	}
	if err := tp.wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	if s, ok := tp.Link.(*Server); ok {
		st := s.Stats().Snapshot()
		t.Logf("server link: %+v", st)
		if st.Violations != 0 {
			t.Errorf("%d violations from a well-behaved client", st.Violations)
		}
	}
}
