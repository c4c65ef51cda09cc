package agentapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Call sends req, with Version set, and the descriptors fds to the agent
// listening at socketPath and returns its response. The descriptors stay
// open in the caller (the kernel passes duplicates). ctx bounds the connect
// and the exchange.
//
// Every error is an *Error (use ToCNI):
//   - req invalid, fds not what req needs, or the request larger than
//     MaxMessageSize: the code of Validate/ValidateFDs, CodeInvalidConfig
//     for the size; nothing is sent;
//   - the agent not running (no socket, connection refused), not
//     answering, or ctx done: CodeTryAgainLater, with ctx's error in the
//     chain when ctx ended the call;
//   - an unreadable answer: CodeDecodingFailure or CodeVersionMismatch;
//   - the agent's own error: that error, returned together with the
//     response.
func Call(ctx context.Context, socketPath string, req *Request, fds []int) (*Response, error) {
	if req == nil {
		return nil, &Error{Code: CodeInvalidConfig, Msg: "nil request"}
	}
	r := *req
	r.Version = Version
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if err := r.ValidateFDs(len(fds)); err != nil {
		return nil, err
	}
	b, err := json.Marshal(&r)
	if err != nil {
		return nil, &Error{Code: CodeInvalidConfig, Msg: "cannot encode request", Details: err.Error(), cause: err}
	}
	if len(b) > MaxMessageSize {
		return nil, &Error{
			Code:    CodeInvalidConfig,
			Msg:     r.Op + " request too large",
			Details: fmt.Sprintf("request is %d bytes, more than the protocol's limit of %d", len(b), MaxMessageSize),
		}
	}

	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socketPath)
	if err != nil {
		return nil, dialError(ctx, socketPath, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(dl); err != nil {
			return nil, ioError(ctx, socketPath, "set deadline", err)
		}
	}
	// Cancellation without a deadline: wake the blocked I/O.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := conn.WriteMsgUnix(b, oob, nil)
	if err == nil && (n != len(b) || oobn != len(oob)) {
		err = fmt.Errorf("short write: %d of %d bytes, %d of %d control bytes", n, len(b), oobn, len(oob))
	}
	if err != nil {
		return nil, ioError(ctx, socketPath, "send request", err)
	}

	buf := make([]byte, MaxMessageSize)
	// No control buffer: descriptors the agent might send are dropped by
	// the kernel.
	n, _, flags, _, err := conn.ReadMsgUnix(buf, nil)
	if err == nil && n == 0 {
		err = errors.New("agent closed the connection without answering")
	}
	if err != nil {
		return nil, ioError(ctx, socketPath, "receive response", err)
	}
	if flags&unix.MSG_TRUNC != 0 {
		return nil, &Error{Code: CodeDecodingFailure, Msg: "agent response too large", Details: fmt.Sprintf("more than %d bytes", MaxMessageSize)}
	}
	resp, err := DecodeResponse(buf[:n], r.Op)
	if err != nil {
		return nil, err
	}
	if resp.Error != nil {
		return resp, resp.Error
	}
	return resp, nil
}

// dialError maps a failed connect to CodeTryAgainLater (agent not running)
// or, for a socket the caller may not open, CodePermissionDenied.
func dialError(ctx context.Context, path string, err error) *Error {
	if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		return &Error{Code: CodePermissionDenied, Msg: "cannot connect to the agent", Details: err.Error(), cause: err}
	}
	e := &Error{Code: CodeTryAgainLater, Msg: "shm-agent is not running", Details: fmt.Sprintf("connect %s: %v", path, err), cause: err}
	if ctx.Err() != nil {
		e.Msg = "shm-agent did not accept the connection in time"
		e.cause = errors.Join(err, context.Cause(ctx))
	}
	return e
}

// ioError maps a failure after connect to CodeTryAgainLater, keeping ctx's
// error in the chain when ctx ended the exchange.
func ioError(ctx context.Context, path, op string, err error) *Error {
	e := &Error{Code: CodeTryAgainLater, Msg: "shm-agent did not answer", Details: fmt.Sprintf("%s on %s: %v", op, path, err), cause: err}
	if ctx.Err() != nil {
		e.cause = errors.Join(err, context.Cause(ctx))
	} else if _, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) {
		// The socket deadline (ctx's) fired before ctx's own timer.
		e.cause = errors.Join(err, context.DeadlineExceeded)
	}
	return e
}
