package queue

// Notification states, the first 32-bit word of a queue's shared-data page.
// The consumer of a queue writes it; the producer reads it after publishing
// and writes the queue's eventfd unless notifications are disabled.
const (
	// NotifyUninitialized is the state of a fresh page: notify.
	NotifyUninitialized = 0
	// NotifyDisabled: the consumer is awake and will look at the ring.
	NotifyDisabled = 1
	// NotifyEnabled: the consumer may be asleep on the eventfd.
	NotifyEnabled = 2
)

// consumerState is the consumer's side of a notification word.
type consumerState struct{ m *mapping }

// EnableNotification asks the producer to write the eventfd. The consumer
// must look at the ring once more after calling it, before it sleeps.
func (c consumerState) EnableNotification() { c.m.state.Store(NotifyEnabled) }

// DisableNotification tells the producer the consumer is awake.
func (c consumerState) DisableNotification() { c.m.state.Store(NotifyDisabled) }

// producerState is the producer's side of a notification word.
type producerState struct{ m *mapping }

// wantsNotification reports whether the consumer may be asleep.
func (p producerState) wantsNotification() bool { return p.m.state.Load() != NotifyDisabled }
