"""The verifier's harness: runs inside the sandbox, under the sandbox's own Python, stdlib only.

It never imports kdkit. :mod:`kdkit.evaluate.sandbox` starts it as ``python3 -I -B harness.py FD ENTRY``
with a fresh 32-byte key on standard input, the candidate's source in ``program.py`` and, for a
task, the task's test in ``test.py``. A program *passes* only when this harness reports so on
file descriptor FD, in a line ``status<TAB>reason<TAB>mac`` whose ``mac`` is keyed BLAKE2b of
``status<TAB>reason`` under the key. Exiting (``sys.exit``, ``os._exit``, at shutdown, from a
thread), crashing or printing anything is never a pass: the parent accepts only a report whose
MAC checks out.

Why the candidate cannot write that report:

* the key is read from standard input before any candidate code runs, and lives only in a local
  of the main thread's frame; the candidate runs in a second thread started with ``_thread`` (no
  ``Thread`` object lists its arguments), which cannot install Python signal handlers (so no
  handler is ever handed the main thread's frame; SIGINT is ignored);
* an audit hook, which cannot be removed, refuses every route to another frame or object's
  memory: ``sys._getframe``, ``sys._current_frames``, ``tb_frame``/``gi_frame``/``cr_frame``/
  ``ag_frame``, the ``gc`` walkers, ``sys.settrace``/``setprofile``, ``ctypes``, the C-API test
  modules, subinterpreters (which run without the hook), new or replaced code objects,
  ``marshal.loads``, and opening ``/proc/*/mem``;
* the harness binds ``os.write``, ``os._exit`` and BLAKE2b before the candidate runs, so
  patching the ``os`` or ``hashlib`` modules changes nothing here;
* ``check`` is called only if it is a function compiled from ``test.py``'s own source, with the
  program's namespace as globals: a thread that swaps ``check`` cannot make a no-op pass.

What no harness can catch (README's threat model): a returned object whose ``==`` is always
true, or a program that changes what the test's own names mean (builtins, ``math.isclose``).
"""

import _blake2
import _signal
import _thread
import builtins
import os
import sys
import types  # noqa: F401 - imported before the audit hook: its import reads a traceback's frame

# C modules otherwise: the sandbox reads no .pyc, so every Python module imported here is compiled per run.
_FUNCTION = type(lambda: None)
_CODE = type((lambda: None).__code__)

def _make_audit_hook():
    """The hook, built from names bound here: it reads no global that the candidate could rebind, and
    nothing refers to it once it is installed."""
    frame_attrs = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
    refused = frozenset({"sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
                         "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                         "code.__new__", "function.__new__", "marshal.loads", "marshal.load", "os.symlink"})
    mem_files = frozenset({"mem", "pagemap"})
    refused_modules = ("ctypes", "_ctypes", "_test", "_xx", "_interp")
    value_error, runtime_error, _type, fsdecode = ValueError, RuntimeError, type, os.fsdecode
    rstrip, rpartition, startswith = str.rstrip, str.rpartition, str.startswith

    def path_of(p):
        # A path object could name one file to this hook and another to open(): only plain values pass.
        if _type(p) is str:
            return p
        if _type(p) is bytes:
            return fsdecode(p)
        if _type(p) is int:
            return ""
        raise runtime_error("kdkit verifier: open() takes a str or bytes path here (pass str(path))")

    def hook(event, args):
        if event in refused or startswith(event, "ctypes."):
            if event == "sys._getframe":  # the stdlib's callers (namedtuple, enum, typing) tolerate ValueError
                raise value_error("kdkit verifier: frame introspection is refused")
            raise runtime_error("kdkit verifier: " + event + " is refused")
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise runtime_error("kdkit verifier: reading a frame is refused")
        if event == "object.__setattr__" and args[1] in ("__code__", "__globals__", "__closure__"):
            raise runtime_error("kdkit verifier: replacing a function's code is refused")
        # ctypes reads memory; the test modules expose the C API; a subinterpreter runs without this hook
        if event == "import" and _type(args[0]) is str and (startswith(args[0], refused_modules)):
            raise runtime_error("kdkit verifier: importing " + args[0] + " is refused")
        if event == "open" and rpartition(rstrip(path_of(args[0]), "/"), "/")[2] in mem_files:
            raise runtime_error("kdkit verifier: reading process memory is refused")

    return hook


def _text(exc):
    """``str(exc)`` as a plain, short str; candidate code may run (``__str__``) but gets no say in the status."""
    try:
        return str.__getitem__(str(exc), slice(0, 300))
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not change the verdict
        return "(unprintable)"


def _reason(exc):
    try:
        name = type.__getattribute__(type(exc), "__name__")
    except BaseException:  # noqa: BLE001
        name = "Exception"
    text = _text(exc)
    return name + ": " + text if text else name


STATUSES = ("passed", "failed", "exited", "oom", "error")  # a verdict carries an index into this


def _status_of(exc):
    if isinstance(exc, AssertionError):
        text = _text(exc)
        return 1, "assertion failed: " + text if text else "assertion failed"
    if isinstance(exc, SystemExit):
        return 2, "exited before the tests finished (SystemExit " + _text(exc) + ")"
    if isinstance(exc, MemoryError):
        return 3, _reason(exc)
    return 4, _reason(exc)


def _check_codes(code):
    """Every code object named ``check`` compiled from the test's source."""
    out = []
    for c in code.co_consts:
        if isinstance(c, _CODE):
            if c.co_name == "check":
                out.append(c)
            out.extend(_check_codes(c))
    return out


def _run(box, done, entry):
    """The candidate's thread: the program, then the test, then ``check(entry)``.

    Every name used after the program starts is bound first: the program may rebind builtins and
    this module's globals."""
    _exec, _type, function_type, status_of, show = exec, type, _FUNCTION, _status_of, sys.__excepthook__
    try:
        ns = {"__name__": "__candidate__", "__builtins__": builtins}
        with open("program.py", encoding="utf-8") as fh:
            program = compile(fh.read(), "program.py", "exec", dont_inherit=True)
        test, codes = None, ()
        if entry:
            with open("test.py", encoding="utf-8") as fh:
                test = compile(fh.read(), "test.py", "exec", dont_inherit=True)
            codes = tuple(_check_codes(test))
        _exec(program, ns)
        if test is not None:
            _exec(test, ns)
            check = ns.get("check")
            ours = _type(check) is function_type and check.__globals__ is ns
            if ours:
                ours = False
                for c in codes:
                    ours = ours or check.__code__ is c
            if not ours:
                box.append((4, "check is not the test's own function"))
                return
            if entry not in ns:
                box.append((4, "NameError: the entry point " + repr(entry) + " is not defined"))
                return
            check(ns[entry])
        box.append((0, ""))
    except BaseException as e:  # noqa: BLE001 - every way out of the test is a verdict
        try:
            show(_type(e), e, e.__traceback__)  # the C traceback printer: the stderr a user reads
        except BaseException:  # noqa: BLE001
            pass
        box.append(status_of(e))
    finally:
        done.release()


def main():
    write, _exit, mac, encode, replace, _type = os.write, os._exit, _blake2.blake2b, str.encode, str.replace, type
    _int, _str = int, str
    streams = (sys.stdout, sys.stderr)  # the real ones: flushed before the verdict, whatever the program rebinds
    statuses = STATUSES
    fd, entry = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""
    key = b""
    while len(key) < 32:
        chunk = os.read(0, 32 - len(key))
        if not chunk:
            break
        key += chunk
    if len(key) != 32:
        _exit(3)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # _thread.interrupt_main must not run code in this frame
    _thread.stack_size(64 * 1024 * 1024)  # deep recursion in tests needs the main thread's room
    sys.addaudithook(_make_audit_hook())
    box, done = [], _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(_run, (box, done, entry))
    done.acquire()
    code, reason = box[0] if box else (4, "the test's thread ended without a verdict")
    if _type(code) is _int and 0 <= code < 5 and _type(reason) is _str:
        status = statuses[code]
    else:
        status, reason = "error", "malformed verdict"
    for stream in streams:
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed stream loses output, not the verdict
            pass
    msg = encode(status + "\t" + replace(replace(reason, "\t", " "), "\n", " "), "utf-8", "replace")
    write(fd, msg + b"\t" + encode(mac(msg, key=key).hexdigest()) + b"\n")
    _exit(0)


if __name__ == "__main__":
    main()
