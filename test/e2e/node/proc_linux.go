package node

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// stopGrace bounds how long a process gets to exit after SIGTERM before it
// is killed: a hang guard, not a timing anybody tests.
const stopGrace = 30 * time.Second

// process is a child process started inside a network namespace.
type process struct {
	name string    // immutable
	cmd  *exec.Cmd // immutable after start
	// done is closed once the process has exited and err is set.
	done chan struct{}
	// err is the exit error (nil for a zero exit); read after done.
	err error
	// stdout carries the process's stdout lines when lines was asked for;
	// closed at end of file.
	stdout chan string
	// stopOnce makes stop idempotent.
	stopOnce sync.Once
}

// startIn starts cmd inside n (nil: the process's own namespace) from the
// spawner thread (see spawn), and the child gets SIGKILL when the test
// process dies (PR_SET_PDEATHSIG). With lines, its stdout is read line by
// line into process.stdout; lines that find the channel full once the
// process has exited are dropped.
func startIn(n ns.NetNS, name string, cmd *exec.Cmd, lines bool) (*process, error) {
	p := &process{name: name, cmd: cmd, done: make(chan struct{})}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	var r, w *os.File
	if lines {
		var err error
		// A pipe of our own, not StdoutPipe: Wait then does not depend
		// on the reader, so done means the process ended.
		if r, w, err = os.Pipe(); err != nil {
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
		cmd.Stdout = w
		p.stdout = make(chan string, 1024)
	}
	err := spawn(n, cmd)
	if w != nil {
		w.Close() // the child has its own
	}
	if err != nil {
		if r != nil {
			r.Close()
		}
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	if lines {
		go func() {
			defer r.Close()
			defer close(p.stdout)
			sc := bufio.NewScanner(r)
			// A round-trip report (the sandbox's rtt mode) is one line
			// of every round trip's time.
			sc.Buffer(nil, 4<<20)
			for sc.Scan() {
				select {
				case p.stdout <- sc.Text():
				case <-p.done:
					select {
					case p.stdout <- sc.Text():
					default:
					}
				}
			}
		}()
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// pid returns the process id.
func (p *process) pid() int { return p.cmd.Process.Pid }

// cpu returns the CPU time (user and system) the process has used so far:
// from /proc while it runs, from its exit status once it has ended.
func (p *process) cpu() time.Duration {
	if ok, _ := p.exited(); !ok {
		if d, err := procCPU(p.pid()); err == nil {
			return d
		}
		// Ended between the two looks: its status is on the way.
		select {
		case <-p.done:
		case <-time.After(time.Second):
			return 0
		}
	}
	st := p.cmd.ProcessState
	if st == nil {
		return 0
	}
	return st.UserTime() + st.SystemTime()
}

// clockTicks is the unit of /proc/PID/stat's times: USER_HZ, 100 on every
// Linux architecture the project runs on (times(2)).
const clockTicks = 100

// procCPU reads the user and system time of process pid from /proc.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from after its closing parenthesis (state is field 3).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks uint64
	for _, s := range f[11:13] { // utime, stime: fields 14 and 15
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// exited reports whether the process has ended, and how.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// stop sends SIGTERM to the process (by its pid), waits for it to exit and
// kills it if it does not within stopGrace. It returns the exit error: nil
// when the process exited with status 0.
func (p *process) stop() error { return p.stopWithin(stopGrace) }

// stopWithin is stop with a grace of d.
func (p *process) stopWithin(d time.Duration) error {
	p.stopOnce.Do(func() {
		if ok, _ := p.exited(); ok {
			return
		}
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
			p.cmd.Process.Kill()
		}
		select {
		case <-p.done:
		case <-time.After(d):
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	<-p.done
	return p.err
}

// kill kills the process (by its pid) and waits for it.
func (p *process) kill() {
	if ok, _ := p.exited(); !ok {
		p.cmd.Process.Kill()
	}
	<-p.done
}

// FDCount returns how many file descriptors process pid has open.
func FDCount(pid int) (int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return 0, fmt.Errorf("fds of %d: %w", pid, err)
	}
	return len(ents), nil
}

// MemfdMappings returns how many mappings of memfd files (the queues'
// shared memory) process pid has.
func MemfdMappings(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/maps")
	if err != nil {
		return 0, fmt.Errorf("maps of %d: %w", pid, err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "/memfd:") {
			n++
		}
	}
	return n, nil
}

// The spawner: PR_SET_PDEATHSIG fires when the *thread* that forked the
// child ends, not the process. Go ends threads behind the caller's back:
// a goroutine that exits while locked to its thread takes the thread with
// it (the CNI libraries' NewNS does so on purpose), and any unlocked thread
// that forked a child may be the next one. So every child is forked by one
// goroutine locked for good to its own thread, which lives as long as the
// process.
var spawner struct {
	once sync.Once
	reqs chan spawnReq
}

// Run runs a command inside n (nil: the process's own netns) and returns
// its combined output; the error names the command and carries the output.
func Run(ctx context.Context, n ns.NetNS, name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := spawn(n, cmd); err != nil {
		return "", fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	if err := cmd.Wait(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// Spawn starts cmd inside n (nil: this process's own network namespace)
// from a thread that never exits: a child's parent-death signal
// (SysProcAttr.Pdeathsig) follows the thread that forked it, not the
// process, and Go ends threads (those a goroutine left locked), which
// would kill the child long before this process ends.
func Spawn(n ns.NetNS, cmd *exec.Cmd) error { return spawn(n, cmd) }

// spawnReq asks the spawner to start cmd in ns (nil: home).
type spawnReq struct {
	ns   ns.NetNS
	cmd  *exec.Cmd
	done chan error
}

// spawn starts cmd inside n (nil: the process's own netns) from the
// spawner thread.
func spawn(n ns.NetNS, cmd *exec.Cmd) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan spawnReq)
		ready := make(chan struct{})
		go spawnLoop(ready)
		<-ready
	})
	r := spawnReq{ns: n, cmd: cmd, done: make(chan error, 1)}
	spawner.reqs <- r
	return <-r.done
}

// spawnLoop serves spawn on a thread it never unlocks.
func spawnLoop(ready chan<- struct{}) {
	runtime.LockOSThread()
	home, err := ns.GetCurrentNS()
	close(ready)
	for r := range spawner.reqs {
		if err != nil {
			r.done <- fmt.Errorf("spawner: own netns: %w", err)
			continue
		}
		target := r.ns
		if target == nil {
			target = home
		}
		if err := target.Set(); err != nil {
			r.done <- fmt.Errorf("spawner: enter %s: %w", target.Path(), err)
			continue
		}
		// The child is forked from this thread, in target.
		serr := r.cmd.Start()
		if err := home.Set(); err != nil {
			// Every request enters its target first: a thread left
			// elsewhere only matters to a nil target, which home.Set
			// retries then.
			serr = errors.Join(serr, fmt.Errorf("spawner: back to own netns: %w", err))
		}
		r.done <- serr
	}
}
