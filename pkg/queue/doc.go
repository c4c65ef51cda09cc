// Package queue implements shm-cni's shared-memory queue pair: its creation on
// sealed memfd memory, its mapping, the ring ("pipe") and descriptor formats,
// the notification word and the order in which its file descriptors cross a
// unix socket.
//
// The wire layout is the one of gVisor's pkg/tcpip/link/sharedmem, so a
// sandbox built on gVisor's own sharedmem client can talk to shm-cni's server
// and the other way round. The code is shm-cni's own because the peer is
// untrusted: every header, offset, length, index and count read from shared
// memory is read once into private memory and checked before use, and a peer
// that breaks the protocol gets an error ([ErrViolation]) that the caller
// answers by cutting it off.
//
// # Layout
//
// A queue pair is two queues, TX (sandbox to agent) and RX (agent to
// sandbox), named from the sandbox's (the client's) point of view. Each queue
// is five file descriptors, in this order on the wire ([QueueFDs.FDs]):
//
//	Data        the data region, cut into buffers of BufferSize bytes
//	Event       an eventfd the consumer of the queue sleeps on
//	TxPipe      the ring the client writes (TX: packet descriptors,
//	            RX: posted empty buffers)
//	RxPipe      the ring the server writes (TX: completed packet ids,
//	            RX: filled buffers)
//	SharedData  a page whose first 32-bit word is the notification state
//
// A ring is a single-producer single-consumer sequence of 8-byte aligned
// slots, each led by a 64-bit header: bit 63 set means "free", the low 32 bits
// are the payload size. Descriptor formats are in desc.go.
//
// # Roles
//
// Four types drive the four ring pairs:
//
//	Sender    client side of TX: copies frames into buffers, posts descriptors
//	Receiver  server side of TX: copies frames out, completes descriptors
//	Filler    server side of RX: copies frames into buffers the client posted
//	Poster    client side of RX: posts buffers, copies filled frames out
//
// None of them is safe for concurrent use; pkg/endpoint/shm wraps them into
// gVisor link endpoints with the locking, waiting and notification policy.
package queue
