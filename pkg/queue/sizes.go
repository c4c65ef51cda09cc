package queue

import (
	"errors"
	"fmt"
)

// Sizes are the sizes of one queue of a pair. Both queues of a pair use the
// same sizes.
type Sizes struct {
	// DataSize is the size in bytes of the data region. It must be a
	// multiple of the page size and of BufferSize.
	DataSize uint64 `json:"dataSize"`
	// PipeSize is the size in bytes of each of the two rings. It must be a
	// multiple of the page size.
	PipeSize uint64 `json:"pipeSize"`
	// BufferSize is the size in bytes of one buffer of the data region. A
	// frame larger than a buffer spans several buffers.
	BufferSize uint32 `json:"bufferSize"`
}

const (
	// DefaultDataSize is the default data region size: 4 MiB, 2048
	// buffers of 2 KiB. A single gVisor TCP stream at MTU 1500 keeps more
	// than 1024 segments in flight; with 512 or 1024 buffers (1 or 2 MiB)
	// the agent dropped hundreds of frames per GiB and the stream stalled on
	// retransmission timeouts; with 2048 it dropped none (BenchmarkTCPThroughput).
	DefaultDataSize = 4 << 20
	// DefaultPipeSize is the default ring size: 256 KiB holds 5461 RX
	// completions of one buffer (8 B slot header + 8 B header + 28 B =
	// 44 B, rounded to 48 B) or 6553 TX descriptors (8 + 16 + 12 = 36 B,
	// rounded to 40 B), more than the 2048 buffers.
	DefaultPipeSize = 256 << 10
	// DefaultBufferSize is the default buffer size: 2 KiB holds a 1500 B
	// frame with its Ethernet (14 B) and virtio-net (10 B) headers.
	DefaultBufferSize = 2048

	// SharedDataSize is the size of the shared-data page.
	SharedDataSize = 4096

	pageSize = 4096

	// MaxDataSize bounds the data region: 1 GiB.
	MaxDataSize = 1 << 30
	// MaxPipeSize bounds a ring: offsets within a ring are 32 bits; 64 MiB
	// is far more than any sensible ring.
	MaxPipeSize = 64 << 20
	// MinBufferSize is the smallest buffer: one minimal Ethernet frame.
	MinBufferSize = 64
	// MaxBufferSize bounds a buffer: 64 KiB + headers fits in 128 KiB.
	MaxBufferSize = 128 << 10
)

// DefaultSizes returns the default sizes (4 MiB data, 256 KiB rings, 2 KiB
// buffers: 2 x 4.5 MiB of shared memory per pair, touched as it is used).
func DefaultSizes() Sizes {
	return Sizes{DataSize: DefaultDataSize, PipeSize: DefaultPipeSize, BufferSize: DefaultBufferSize}
}

// Buffers returns the number of buffers in the data region.
func (s Sizes) Buffers() uint64 { return s.DataSize / uint64(s.BufferSize) }

// EthernetHeaderSize is the link header in front of every IP packet on a
// shared-memory link (a 14-byte Ethernet header: destination, source,
// EtherType).
const EthernetHeaderSize = 14

// MaxFrame returns the largest frame a queue of valid sizes s carries: a
// frame spans at most MaxBuffersPerFrame buffers and must fit the data
// region.
func (s Sizes) MaxFrame() uint64 {
	return min(MaxBuffersPerFrame*uint64(s.BufferSize), s.DataSize)
}

// MaxMTU returns the largest IP MTU of a link over queues of valid sizes s,
// at most 65535 (the largest IP packet): MaxFrame less the Ethernet
// header. With the default 2 KiB buffers that is 65535 (64 x 2048 - 14 =
// 131058 bytes would fit); 512-byte buffers carry at most
// 64 x 512 - 14 = 32754.
func (s Sizes) MaxMTU() uint32 {
	f := s.MaxFrame()
	if f <= EthernetHeaderSize {
		return 0
	}
	return uint32(min(f-EthernetHeaderSize, 1<<16-1))
}

// CheckMTU reports whether a link of IP MTU mtu fits queues of valid
// sizes s, with an error saying what does.
func (s Sizes) CheckMTU(mtu uint32) error {
	if m := s.MaxMTU(); mtu > m {
		return fmt.Errorf("MTU %d does not fit the queue: a frame spans at most %d buffers of %d bytes within a %d-byte data region, so the MTU is at most %d",
			mtu, MaxBuffersPerFrame, s.BufferSize, s.DataSize, m)
	}
	return nil
}

// Validate reports every problem with s at once.
func (s Sizes) Validate() error {
	var errs []error
	if s.BufferSize < MinBufferSize || s.BufferSize > MaxBufferSize || s.BufferSize%8 != 0 {
		errs = append(errs, fmt.Errorf("bufferSize: %d must be a multiple of 8 in [%d, %d]", s.BufferSize, MinBufferSize, MaxBufferSize))
	}
	if s.DataSize == 0 || s.DataSize > MaxDataSize || s.DataSize%pageSize != 0 {
		errs = append(errs, fmt.Errorf("dataSize: %d must be a multiple of %d in [%d, %d]", s.DataSize, pageSize, pageSize, MaxDataSize))
	} else if s.BufferSize != 0 && s.DataSize%uint64(s.BufferSize) != 0 {
		errs = append(errs, fmt.Errorf("dataSize: %d must be a multiple of bufferSize %d", s.DataSize, s.BufferSize))
	}
	if s.PipeSize == 0 || s.PipeSize > MaxPipeSize || s.PipeSize%pageSize != 0 {
		errs = append(errs, fmt.Errorf("pipeSize: %d must be a multiple of %d in [%d, %d]", s.PipeSize, pageSize, pageSize, MaxPipeSize))
	}
	if len(errs) == 0 {
		// Every buffer of the data region may be in flight at once: the
		// rings must hold a one-buffer descriptor, a posted buffer and a
		// one-buffer completion for each.
		n := s.Buffers()
		for _, rec := range []struct {
			name string
			size uint64
		}{
			{"TX descriptors", txPacketHeaderSize + txBufferDescSize},
			{"posted buffers", postedBufferSize},
			{"RX completions", rxCompletionHeaderSize + rxCompletionBufferSize},
		} {
			if c := pipeCapacity(s.PipeSize, rec.size); c < n {
				errs = append(errs, fmt.Errorf("pipeSize: %d holds %d %s, fewer than the %d buffers of dataSize/bufferSize", s.PipeSize, c, rec.name, n))
			}
		}
	}
	return errors.Join(errs...)
}
