// Package agentapi is the wire protocol between the shm-cni CNI binary and
// the shm-agent node agent.
//
// The agent listens on a unix SOCK_SEQPACKET socket (DefaultSocketPath,
// mode 0600, root only). Every connection carries exactly one exchange:
//
//  1. the CNI binary sends one Request, encoded as JSON in a single
//     record of at most MaxMessageSize bytes, with up to MaxFDs file
//     descriptors attached as SCM_RIGHTS (the queue FDs of a shm link, or
//     the TAP fd of a kernel link);
//  2. the agent answers with one Response in a single record, without FDs,
//     and closes the connection.
//
// Every message carries Version. A request of another version is refused
// with CodeVersionMismatch before anything else in it is looked at.
//
// CNI binary side:
//
//	resp, err := agentapi.Call(ctx, agentapi.DefaultSocketPath, &agentapi.Request{
//		Op:     agentapi.OpAttach,
//		Attach: &agentapi.AttachRequest{...},
//	}, queueFDs)
//	if err != nil {
//		return agentapi.ToCNI(err) // a *types.Error with the right CNI code
//	}
//
// The caller keeps its own FDs: the kernel duplicates them into the agent.
// An agent that is not running yields CodeTryAgainLater.
//
// Agent side:
//
//	ln, err := agentapi.Listen(agentapi.DefaultSocketPath)
//	srv, err := agentapi.NewServer(ln, handler, log)
//	go srv.Serve(ctx) // returns once ctx is done or Close is called
//	...
//	srv.Close() // stops accepting, waits for requests in flight
//
// The server reads and checks the request (peer uid, size, strict JSON,
// Request.Validate, Request.ValidateFDs) and only then calls the Handler.
// The Handler owns the received files from the moment it is called; on any
// failure before that the server closes them, so nothing leaks.
// Handlers return *Error (see the Code constants) to choose the CNI error
// code the CNI binary reports; any other error becomes CodeInternal.
//
// The package is Linux only.
package agentapi
