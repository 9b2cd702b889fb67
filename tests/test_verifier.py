"""The verifier cannot be gamed: a corpus of programs that try to pass without solving the task.

Each gaming completion answers the task wrongly (or not at all) and tries to make the verdict
"passed" anyway: by exiting early, at shutdown, from a thread or a signal handler, through the
exception hooks, by forging the harness's report, by reaching into the harness's memory or by
rebinding what the harness uses. None may pass; the correct control must. The result says why.
"""

from __future__ import annotations

import shutil

import pytest

from kdkit.evaluate.passrate import program_for, verify
from kdkit.evaluate.sandbox import Limits, Program, run_programs
from kdkit.evaluate.tasks import Task

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
LIMITS = Limits(timeout_s=6.0, memory_mb=512)
TASK = Task("T/0", "def square(x):\n", "square",
            "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
            "    assert candidate(-5) == 25\n")
CORRECT = "    return x * x\n"
WRONG = "    return 0\n"

# name -> (completion, the status(es) it may end with). Every completion here is wrong or absent.
GAMING = {
    "sys_exit_in_body": ("    import sys\n    sys.exit(0)\n", "exited"),
    "sys_exit_at_import": ("    return 0\nimport sys\nsys.exit(0)\n", "exited"),
    "raise_system_exit": ("    raise SystemExit(0)\n", "exited"),
    "builtin_exit": ("    exit(0)\n", "exited"),
    "builtin_quit": ("    quit()\n", "exited"),
    "os_exit_in_body": ("    import os\n    os._exit(0)\n", "exited"),
    "os_exit_at_import": ("    return 0\nimport os\nos._exit(0)\n", "exited"),
    "atexit_os_exit": ("    return 0\nimport atexit, os\natexit.register(os._exit, 0)\n", "failed"),
    "atexit_sys_exit": ("    return 0\nimport atexit, sys\natexit.register(sys.exit, 0)\n", "failed"),
    "del_at_shutdown": ("    return 0\nimport os\nclass _D:\n    def __del__(self):\n        os._exit(0)\n"
                        "_keep = _D()\n", "failed"),
    "weakref_finalize": ("    return 0\nimport os, weakref\nclass _O: pass\n_o = _O()\n"
                         "weakref.finalize(_o, os._exit, 0)\n", "failed"),
    "thread_os_exit": ("    import os, threading, time\n    threading.Thread(target=os._exit, args=(0,)).start()\n"
                       "    time.sleep(2)\n    return 0\n", "exited"),
    "daemon_thread_exit_late": ("    return 0\nimport os, threading, time\n"
                                "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0)), daemon=True).start()\n",
                                "failed"),
    "thread_swaps_check": ("    return 0\nimport threading\n_g = globals()\ndef _swap():\n    for _ in range(10**6):\n"
                           "        _g['check'] = lambda c: None\nthreading.Thread(target=_swap, daemon=True).start()\n",
                           "error failed"),  # refused if the swap lands before the call, else the real check fails
    "signal_alarm_exit": ("    import os, signal, time\n    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                          "    signal.alarm(1)\n    time.sleep(3)\n    return 0\n", "error"),
    "interrupt_main": ("    import _thread, time\n    _thread.interrupt_main()\n    time.sleep(0.5)\n    return 0\n",
                       "failed"),
    "kill_self_sigterm": ("    import os, signal\n    os.kill(os.getpid(), signal.SIGTERM)\n", "exited"),
    "kill_self_sigkill": ("    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n", "exited"),
    "abort": ("    import os\n    os.abort()\n", "exited"),
    "excepthook_exit": ("    return 0\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\n", "failed"),
    "threading_excepthook_exit": ("    return 0\nimport os, threading\nthreading.excepthook = lambda a: os._exit(0)\n",
                                  "failed"),
    "print_fake_markers": ("    print('passed'); print('ALL TESTS PASSED'); import sys\n"
                           "    print('passed', file=sys.stderr)\n    return 0\n", "failed"),
    "forge_verdict_on_every_fd": ("    import os\n    for fd in range(3, 256):\n        try:\n"
                                  "            os.write(fd, b'passed\\t\\t' + b'0' * 128 + b'\\n')\n"
                                  "        except OSError:\n            pass\n    return 0\n", "error"),
    "close_verdict_fds": ("    import os\n    os.closerange(3, 256)\n    return x * x\n", "exited"),
    "dup_over_verdict_fd": ("    import os\n    r, w = os.pipe()\n    for fd in range(3, 64):\n        try:\n"
                            "            os.dup2(w, fd)\n        except OSError:\n            pass\n    return 0\n",
                            "exited"),
    "unterminated_string_swallows_test": ('    return """\n', "error"),
    "defines_own_check": ("    return 0\ndef check(candidate):\n    pass\n", "failed"),
    "stdout_closed": ("    import os, sys\n    sys.stdout.close(); os.close(1)\n    return 0\n", "failed"),
    "gc_walk_for_key": ("    import gc\n    for o in gc.get_objects():\n        pass\n    return 0\n", "error"),
    "frame_walk": ("    import sys\n    f = sys._getframe()\n    while f.f_back: f = f.f_back\n    return 0\n", "error"),
    "inspect_stack": ("    import inspect\n    inspect.stack()\n    return 0\n", "error"),
    "traceback_frame_walk": ("    try:\n        1 / 0\n    except ZeroDivisionError as e:\n"
                             "        e.__traceback__.tb_frame.f_back.f_locals\n    return 0\n", "error"),
    "generator_frame": ("    g = (i for i in [1])\n    g.gi_frame\n    return 0\n", "error"),
    "current_frames": ("    import sys\n    sys._current_frames()\n    return 0\n", "error"),
    "settrace_skip_asserts": ("    return 0\nimport sys\ndef _t(f, e, a):\n    return None\nsys.settrace(_t)\n", "error"),
    "ctypes_memory": ("    import ctypes\n    return 0\n", "error"),
    "proc_self_mem": ("    open('/proc/self/mem', 'rb')\n    return 0\n", "error"),
    "proc_mem_by_dir_fd": ("    import os\n    d = os.open('/proc/self', os.O_RDONLY)\n"
                           "    os.open('mem', os.O_RDONLY, dir_fd=d)\n    return 0\n", "error"),
    "ctypes_by_imp": ("    import _imp, importlib.machinery as m, glob\n"
                      "    so = glob.glob('/usr/lib/python3*/lib-dynload/_ctypes.*.so')[0]\n"
                      "    _imp.create_dynamic(m.ModuleSpec('_ctypes', m.ExtensionFileLoader('_ctypes', so), origin=so))\n"
                      "    return 0\n", "error"),
    "testcapi": ("    import _testcapi\n    return 0\n", "error"),
    "subinterpreter": ("    import _xxsubinterpreters as s\n    s.run_string(s.create(), 'import ctypes')\n"
                       "    return 0\n", "error"),
    "code_replace": ("    c = square.__code__.replace(co_consts=(None,))\n    return 0\n", "error"),
    "function_from_check_code": ("    import types\n    types.FunctionType(square.__code__, {})\n    return 0\n", "error"),
    "marshal_bytecode": ("    import marshal\n    marshal.loads(marshal.dumps(square.__code__))\n    return 0\n", "error"),
    "rebind_harness_globals": ("    return 0\nimport __main__\n__main__._check_codes = lambda code: []\n"
                               "__main__._status_of = lambda e: (0, '')\n", "failed"),
    "rebind_builtins": ("    return 0\nimport builtins\nbuiltins.type = lambda *a: int\nbuiltins.exec = lambda *a: None\n"
                        "builtins.str = bytes\n", "failed"),
    "fork_child_reports": ("    import os\n    if os.fork() == 0:\n        return x * x\n    os.wait()\n    return 0\n",
                           "error"),  # no process can start: PermissionError
    "swap_check_code": ("    return 0\nimport threading\n_g = globals()\ndef _swap():\n    while 'check' not in _g:\n"
                        "        pass\n    _g['check'].__code__ = (lambda c: None).__code__\n"
                        "threading.Thread(target=_swap, daemon=True).start()\n", "failed"),
    "rerun_harness_main": ("    return 0\nimport __main__\n__main__.main()\n", "exited"),  # no key to read: exit 3
}

# A process the candidate starts has no audit hook: under the sandbox's uid it could write the harness's memory
# through /proc/PID/mem and turn the bytes of the status "failed" into "passed" (the harness then MACs a pass with
# its real key). Each passed before the process filter; each route must now fail to start its process.
_REWRITE = ("    return 0\nimport os, sys, __main__\n_s = __main__.STATUSES[1]\n"
            "_at = id(_s) + sys.getsizeof(_s) - len(_s) - 1\n"
            "_py = f\"f = open('/proc/{os.getpid()}/mem', 'r+b', buffering=0); f.seek({_at}); f.write(b'passed')\"\n")
CHILD_PROCESSES = {
    "child_subprocess": _REWRITE + "import subprocess\nsubprocess.run([sys.executable, '-c', _py], check=True)\n",
    "child_posix_spawn": _REWRITE + "os.waitpid(os.posix_spawn(sys.executable, [sys.executable, '-c', _py], {}), 0)\n",
    "child_dd_binary": _REWRITE + "import subprocess\nsubprocess.run(['dd', f'of=/proc/{os.getpid()}/mem', 'bs=1', "
                                  "f'seek={_at}', 'conv=notrunc', 'status=none'], input=b'passed', check=True)\n",
    "child_fork_exec_direct": _REWRITE + "import _posixsubprocess as p\nr, w = os.pipe()\n"
                                         "p.fork_exec([sys.executable, '-c', _py], [sys.executable.encode()], True, (), "
                                         "None, None, -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, "
                                         "-1, None, False)\nos.wait()\n",  # below subprocess: no Python-level event
    "grandchild": _REWRITE + "import subprocess\n_outer = f'import subprocess, sys; subprocess.run([sys.executable, "
                             "\"-c\", {_py!r}], check=True)'\nsubprocess.run([sys.executable, '-c', _outer], check=True)\n",
    "child_started_before_check": _REWRITE.replace("    return 0\n", "    import time\n    time.sleep(1.5)\n    return 0\n")
    + "import subprocess\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.5); ' + _py])\n",
    "shell_system": _REWRITE + "os.system(f\"printf passed | dd of=/proc/{os.getpid()}/mem bs=1 seek={_at} conv=notrunc\")\n"
                               "import time\ntime.sleep(0.5)\n",
}
GAMING.update({name: (src, "error failed") for name, src in CHILD_PROCESSES.items()})
# A correct answer leaning on common standard-library modules (threads included) passes under the filter.
STDLIB_CONTROL = ("    import bisect, collections, functools, heapq, itertools, json, math, re, statistics, threading\n"
                  "    from concurrent.futures import ThreadPoolExecutor\n"
                  "    with ThreadPoolExecutor(2) as pool:\n        (y,) = pool.map(lambda v: v * v, [x])\n"
                  "    assert json.loads(json.dumps(collections.Counter([y])))[str(y)] == 1\n"
                  "    assert heapq.nsmallest(1, [y]) == [y] and bisect.bisect([y], y) == 1\n"
                  "    assert re.fullmatch(r'-?\\d+', str(y)) and math.isqrt(y) == abs(x) and statistics.mean([y]) == y\n"
                  "    assert list(itertools.repeat(y, 1)) == [y]\n"
                  "    return functools.reduce(lambda a, b: a * b, [x, x])\n")


@pytest.fixture(scope="module")
def gaming_results():
    names = list(GAMING)
    tasks = [Task(f"G/{n}", TASK.prompt, TASK.entry_point, TASK.test) for n in names]
    completions = {f"G/{n}": [GAMING[n][0]] for n in names}
    for name, body in (("control", CORRECT), ("stdlib_control", STDLIB_CONTROL)):
        completions[f"G/{name}"] = [body]
        tasks.append(Task(f"G/{name}", TASK.prompt, TASK.entry_point, TASK.test))
    res = verify(tasks, completions, limits=LIMITS, workers=2)
    return {r.task_id[2:]: r for r in res}


@pytest.mark.parametrize("name", ["control", "stdlib_control"])
def test_the_correct_controls_pass(gaming_results, name):
    r = gaming_results[name]
    assert r.passed and r.status == "passed" and r.reason == "", (r.status, r.reason, r.stderr_tail[-300:])


@pytest.mark.parametrize("name", [*CHILD_PROCESSES, "fork_child_reports"])
def test_no_process_can_start_inside_the_sandbox(gaming_results, name):
    # refused by the kernel (the process filter), whatever the route: not an accident of the program
    r = gaming_results[name]
    started = "Operation not permitted" in r.reason or "Operation not permitted" in r.stderr_tail
    assert started or name == "shell_system" and r.status == "failed", (name, r.status, r.reason)


@pytest.mark.parametrize("name", list(GAMING))
def test_no_gaming_program_passes(gaming_results, name):
    r = gaming_results[name]
    assert not r.passed, f"{name} passed: {r.stderr_tail[-300:]}"
    assert r.status in GAMING[name][1].split(), (name, r.status, r.reason, r.stderr_tail[-300:])
    assert r.reason, name


def test_reasons_name_what_happened(gaming_results):
    assert gaming_results["sys_exit_in_body"].reason.startswith("exited before the tests finished")
    assert gaming_results["os_exit_in_body"].reason == "exited before the tests finished (exit status 0)"
    assert gaming_results["atexit_os_exit"].reason == "assertion failed"
    assert "channel" in gaming_results["forge_verdict_on_every_fd"].reason
    assert "SyntaxError" in gaming_results["unterminated_string_swallows_test"].reason
    for name in ("gc_walk_for_key", "frame_walk", "inspect_stack", "traceback_frame_walk", "generator_frame",
                 "current_frames", "settrace_skip_asserts", "ctypes_memory", "proc_self_mem", "proc_mem_by_dir_fd",
                 "marshal_bytecode", "ctypes_by_imp", "testcapi", "subinterpreter", "code_replace",
                 "function_from_check_code"):  # refused by the audit hook, not failing by accident
        assert "kdkit verifier:" in gaming_results[name].reason and "refused" in gaming_results[name].reason, name
    assert "main thread" in gaming_results["signal_alarm_exit"].reason  # no handler can be installed


def test_a_wrong_answer_fails_as_an_assertion_and_a_timeout_as_a_timeout():
    slow = "    while True:\n        pass\n"
    res = verify([TASK], {TASK.task_id: [WRONG, slow]}, limits=Limits(timeout_s=2.0, memory_mb=512))
    assert [(r.status, r.reason) for r in res] == [("failed", "assertion failed"), ("timeout", "timeout")]


def test_plain_program_passes_only_when_it_runs_to_its_end():
    res = run_programs(["print(6 * 7)\n", "import sys\nprint(1)\nsys.exit(0)\nprint(2)\n",
                        "import os\nos._exit(0)\n"], limits=LIMITS)
    assert [r.status for r in res] == ["passed", "exited", "exited"]
    assert res[0].stdout_tail.strip() == "42" and res[1].stdout_tail.strip() == "1"


def test_programs_that_write_files_fill_their_own_bounded_space(tmp_path):
    # 1 MB files until the disk is full: the tmpfs stops it at disk_mb, the host disk is untouched
    flood = ("import os\ni = 0\nwhile True:\n    with open(f'/{d}/f{{i}}', 'wb') as fh:\n"
             "        fh.write(b'x' * 1000000)\n    i += 1\n")
    lim = Limits(timeout_s=20.0, memory_mb=512, disk_mb=8)
    res = run_programs([flood.format(d=d) for d in ("sandbox", "tmp", "dev/shm")], limits=lim)
    for r in res:
        assert r.status == "error" and "No space left on device" in r.reason, (r.status, r.reason)
    sized = run_programs(["import os\nst = os.statvfs('/sandbox')\nprint(st.f_blocks * st.f_frsize)\n"], limits=lim)
    assert int(sized[0].stdout_tail.strip()) == 8 * 1024 * 1024


def test_what_no_harness_can_catch_is_what_the_readme_says():
    # An answer whose == is always true passes here as under any in-process checker (README: threat model).
    always = "    class A:\n        def __eq__(self, o):\n            return True\n    return A()\n"
    (r,) = verify([TASK], {TASK.task_id: [always]}, limits=LIMITS)
    assert r.passed


def test_programs_are_the_candidate_then_the_test():
    p = program_for(TASK, CORRECT)
    assert isinstance(p, Program) and p.source == TASK.prompt + CORRECT + "\n"
    assert p.test == TASK.test and p.entry_point == "square"


def test_every_status_the_harness_reports_is_one_the_sandbox_accepts():
    import importlib.util

    from kdkit.evaluate import sandbox

    spec = importlib.util.spec_from_file_location("kdkit_harness_copy", sandbox._HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)  # stdlib only: importable anywhere, runs nothing at import
    assert set(harness.STATUSES) <= set(sandbox.STATUSES) and harness.STATUSES[0] == "passed"
