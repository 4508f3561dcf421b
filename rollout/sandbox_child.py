"""The confined side of `rollout.sandbox`: run as `python -I sandbox_child.py` with a job
(JSON) on stdin, it confines its own process, then runs the job's code sections in one
namespace and reports each section's outcome as a JSON line on the file descriptor the job names.

Confinement, in order, before any untrusted code runs:
- resource limits: address space, CPU seconds, size of any written file, open files, no
  core dumps;
- every capability is dropped (a process started as root keeps uid 0 but no privilege);
- `no_new_privs`, then a Landlock ruleset under which the work directory is the only
  place it may create, write, rename or remove anything (and /dev/null the only other
  file it may write), the interpreter's installation and the system libraries the only
  other places it may read (not /etc, /home, /proc of other processes), TCP bind and
  connect are denied, and (kernel ABI >= 6) signals and abstract unix sockets cannot
  reach processes outside the sandbox;
- a seccomp filter that fails process creation (fork, vfork, clone, clone3), exec,
  socket creation, signalling other processes, ptrace and the administrative system
  calls (mount, namespaces, modules, time, reboot, io_uring, bpf...) with EPERM.
If any step is unavailable the child reports `{"setup_error": ...}` and runs nothing.

Only the standard library is imported here: the script runs in isolated mode (`-I`),
outside the rayft package.
"""

import ctypes
import json
import os
import resource
import struct
import sys
import traceback

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
CAPSET, CAPABILITY_VERSION_3 = 126, 0x20080522
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_TRUNCATE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 14
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Where the interpreter and the libraries it loads live: the only places it may read.
SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/dev/urandom", "/dev/zero")
# Every right that changes the file system, by the Landlock ABI that introduced it.
FS_CHANGES = {1: sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12)), 2: 1 << 13, 3: 1 << 14, 5: 1 << 15}
NET_BIND_CONNECT_TCP = (1 << 0) | (1 << 1)
SCOPE_ABSTRACT_UNIX_AND_SIGNAL = (1 << 0) | (1 << 1)

AUDIT_ARCH_X86_64, X32_SYSCALL_BIT = 0xC000003E, 0x40000000
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
EPERM = 1
# x86_64 numbers: process creation and exec, sockets, signals to others, tracing, and the
# administrative calls (mounts, namespaces, modules, clocks, keys, bpf, io_uring...).
DENIED_SYSCALLS = (
    56, 57, 58, 435, 59, 322,            # clone fork vfork clone3 execve execveat
    41,                                  # socket
    62, 200, 234, 129, 297, 424, 434, 438,  # kill tkill tgkill rt_(tg)sigqueueinfo pidfd_*
    101, 310, 311,                       # ptrace process_vm_readv/writev
    165, 166, 155, 161, 428, 429, 430, 431, 432, 433, 442,  # mount umount2 pivot_root chroot fs*/mount_setattr
    272, 308,                            # unshare setns
    175, 176, 313, 246, 320,             # init/delete/finit_module kexec_load kexec_file_load
    164, 159, 227, 305,                  # settimeofday adjtimex clock_settime clock_adjtime
    167, 168, 169, 170, 171, 172, 173,   # swapon swapoff reboot sethostname setdomainname iopl ioperm
    163, 179, 135,                       # acct quotactl personality
    248, 249, 250, 321, 298, 323,        # add_key request_key keyctl bpf perf_event_open userfaultfd
    303, 304,                            # name_to_handle_at open_by_handle_at
    425, 426, 427,                       # io_uring_setup/enter/register
)

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def set_limits(job: dict) -> None:
    memory = job["memory_mb"] * 1024 * 1024
    cpu = max(1, int(job["cpu_s"] + 0.999))
    for limit, value in ((resource.RLIMIT_AS, (memory, memory)), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_FSIZE, (job["file_mb"] * 1024 * 1024,) * 2),
                         (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)


def drop_capabilities() -> None:
    """Empty effective, permitted and inheritable capability sets: a process started as
    root keeps uid 0 (so it can still read the interpreter it runs from) but loses every
    privilege over other users' files and processes and every administrative right."""
    header = ctypes.create_string_buffer(struct.pack("Ii", CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(bytes(24), 24)
    _check(libc.syscall(CAPSET, header, data), "capset")


def readable_roots() -> list[str]:
    """The interpreter's installation and import path (isolated mode: no PYTHONPATH, no
    working directory) and the system libraries, as existing paths."""
    roots = {sys.prefix, sys.base_prefix, *sys.path, *SYSTEM_READABLE}
    return sorted(r for r in roots if r and os.path.exists(r))


def landlock(work: str) -> None:
    abi = _check(libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                              ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION)), "Landlock")
    fs = FS_READ | sum(bits for since, bits in FS_CHANGES.items() if abi >= since)
    net = NET_BIND_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_AND_SIGNAL if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(libc.syscall(LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    file_rights = FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    rules = [(work, fs), ("/dev/null", FS_READ_FILE | file_rights)] + [(root, FS_READ) for root in readable_roots()]
    for path, rights in rules:
        if not os.path.isdir(path):
            rights &= FS_EXECUTE | FS_READ_FILE | file_rights  # a file takes file rights only
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
        _check(libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, ctypes.c_uint32(0)),
               f"landlock_add_rule {path}")
        os.close(fd)
    _check(libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)


def seccomp() -> None:
    if os.uname().machine != "x86_64":
        raise OSError(f"the sandbox's system-call filter is written for x86_64, not {os.uname().machine}")
    n = len(DENIED_SYSCALLS)
    deny = 5 + n + 1  # index of the EPERM return: 5 header ops, n checks, ALLOW

    def op(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)

    program = [op(0x20, 0, 0, 4),                                  # A = arch
               op(0x15, 1, 0, AUDIT_ARCH_X86_64),                  # x86_64? skip the kill
               op(0x06, 0, 0, SECCOMP_RET_KILL_PROCESS),
               op(0x20, 0, 0, 0)]                                  # A = syscall number
    program.append(op(0x35, deny - 5, 0, X32_SYSCALL_BIT))          # x32 calls: denied
    for i, nr in enumerate(DENIED_SYSCALLS):
        program.append(op(0x15, deny - (5 + i) - 1, 0, nr))
    program += [op(0x06, 0, 0, SECCOMP_RET_ALLOW), op(0x06, 0, 0, SECCOMP_RET_ERRNO | EPERM)]
    assert len(program) == deny + 1
    filters = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(filters))
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog_buffer, 0, 0), "seccomp")


def confine(job: dict) -> None:
    set_limits(job)
    drop_capabilities()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    landlock(job["work"])
    seccomp()
    os.chdir(job["work"])


def describe(exc: BaseException, files: set) -> dict:
    """The exception's type and message, and the innermost line of the program's own code
    (not the standard library's) it was raised from."""
    where = {"file": None, "line": None}
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in files:
            where = {"file": frame.filename.strip("<>"), "line": frame.lineno}
    return {"type": type(exc).__name__, "message": str(exc)[:500], **where}


def run(job: dict, report) -> None:
    namespace = {"__name__": "__main__"}
    files = {f"<{section['file']}>" for section in job["sections"]}
    for index, section in enumerate(job["sections"]):
        try:
            exec(compile(section["source"], f"<{section['file']}>", "exec"), namespace)
            outcome = {"ok": True}
        except MemoryError:
            namespace.clear()  # free what the program held, so the report can be written
            outcome = {"ok": False, "type": "MemoryError", "message": ""}
        except BaseException as exc:  # noqa: BLE001 (the program's own failure is the result)
            outcome = {"ok": False, **describe(exc, files)}
        report({"section": index, **outcome})
        if not outcome["ok"] and section.get("stop_on_error"):
            break
    report({"done": job["nonce"]})


def main() -> None:
    job = json.loads(sys.stdin.read())
    channel = os.fdopen(job["report_fd"], "w", buffering=1)

    def report(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        confine(job)
    except Exception as exc:  # noqa: BLE001
        report({"setup_error": f"{type(exc).__name__}: {exc}"})
        sys.exit(3)
    run(job, report)
    channel.flush()
    os._exit(0)  # no interpreter teardown: atexit hooks the program registered do not run


if __name__ == "__main__":
    main()
