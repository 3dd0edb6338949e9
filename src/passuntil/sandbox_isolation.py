"""The sandbox's isolation primitives (root only): system calls, the check's file system, the
memory cgroup. Used by the zygote (`sandbox_zygote.py`); standard library only.

Python 3.11 has no `os.unshare`/`os.pivot_root`: `unshare`, `mount`, `umount2`, `pivot_root` and
`clone` go through `ctypes` (system call numbers for x86_64, aarch64 and riscv64).
"""

import contextlib
import ctypes
import glob
import os
import platform
import signal
import sys
import sysconfig

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(platform.machine())
SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220}.get(platform.machine())
SYSTEM_DIRS = ("usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # in a check: one tmpfs, the others link to it
_LIBC = ctypes.CDLL(None, use_errno=True)
_PYLIBC = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across the call (for clone)


# ---- system calls --------------------------------------------------------------------------

def _check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), what)


def unshare(flags):
    _check(_LIBC.unshare(flags), "unshare")


def mount(source, target, fstype, flags, data=None):
    args = [None if a is None else os.fsencode(a) for a in (source, target, fstype, data)]
    _check(_LIBC.mount(args[0], args[1], args[2], flags, args[3]), f"mount {target}")


def clone(flags):
    """fork() into new namespaces (one process: the child is pid 1 of its new PID namespace).

    The raw clone system call, made with the GIL held and Python's own before/after-fork
    steps, exactly as `os.fork` makes them."""
    if SYS_CLONE is None:
        raise OSError(0, f"clone: unknown system call number on {platform.machine()}")
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _PYLIBC.syscall(SYS_CLONE, flags | signal.SIGCHLD, None, None, None, None)
    err = ctypes.get_errno()
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
    else:
        ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, "clone")
    return pid


def prctl(option, value):
    _LIBC.prctl(option, value, 0, 0, 0)


# ---- the file system a check sees ---------------------------------------------------------

def python_dirs():
    """The interpreter's own directories (real paths): what a check needs to import stdlib."""
    dirs = {sys.base_prefix, sys.base_exec_prefix, sys.prefix,
            os.path.dirname(os.path.realpath(sys.executable)),
            sysconfig.get_config_var("LIBDIR") or sys.base_prefix,
            *sysconfig.get_paths().values()}
    return sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d)})


def site_dirs(root):
    """Every site-packages / dist-packages directory under `root` (hidden from checks)."""
    found = set()
    for prefix in {"/usr", "/usr/local", sys.prefix, sys.base_prefix, sys.exec_prefix}:
        for lib in ("lib", "lib64", "local/lib"):
            for kind in ("site-packages", "dist-packages"):
                pattern = os.path.join(root + os.path.realpath(prefix), lib, "python3*", kind)
                found.update(glob.glob(pattern))
    return sorted(found)


def bind(fd, target, is_dir):
    """Bind-mount what `fd` (O_PATH, opened before the new root covered /tmp) refers to."""
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    source = f"/proc/self/fd/{fd}"
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def build_root():
    """Once per zygote: private network and mount namespaces, then pivot into a fresh
    read-only root with system software, device nodes and the interpreter only."""
    unshare(CLONE_NEWNS | CLONE_NEWNET)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    binds, links = [], []  # (path, O_PATH fd, is_dir), (path, target)
    for top in SYSTEM_DIRS:
        src = "/" + top
        if os.path.islink(src):
            links.append((src, os.readlink(src)))
        elif os.path.isdir(src):
            binds.append((src, os.open(src, os.O_PATH), True))
    for d in python_dirs():  # an interpreter under /root, /opt, /home, /tmp, ...
        if not any(d == "/" + t or d.startswith(f"/{t}/") for t in SYSTEM_DIRS):
            binds.append((d, os.open(d, os.O_PATH), True))
    for dev in DEVICES:
        if os.path.exists("/dev/" + dev):
            binds.append(("/dev/" + dev, os.open("/dev/" + dev, os.O_PATH), False))
    new = "/tmp"
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
    os.makedirs(new + "/dev")
    for path, target in links:
        os.symlink(target, new + path)
    for path, fd, is_dir in sorted(binds):  # parents before the directories inside them
        if not (is_dir and os.path.isdir(new + path) and os.listdir(new + path)):
            bind(fd, new + path, is_dir)
        os.close(fd)
    for d in site_dirs(new):  # datasets and project code live in site-packages: hide them all
        mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,nr_inodes=1")
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{new}/dev/{name}")
    for d in ("/proc", "/tmp", "/var"):
        os.makedirs(new + d, mode=0o755, exist_ok=True)
    os.chmod(new + "/tmp", 0o1777)
    for d in SCRATCH_DIRS[1:]:  # one scratch tmpfs per check, seen at all three places
        os.symlink("/tmp", new + d)
    os.chdir(new)
    if SYS_PIVOT_ROOT is not None:
        _check(_LIBC.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        _check(_LIBC.umount2(b".", MNT_DETACH), "umount old root")
    else:  # unknown architecture: chroot (the checks never hold CAP_SYS_CHROOT)
        os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


# ---- one memory cgroup per zygote, holding one check at a time -----------------------------

class Cgroup:
    """A cgroup (v2, else v1 memory controller) the zygote reuses for each of its checks.

    Opened before the pivot (the directory stays reachable through its file descriptor)."""

    def __init__(self):
        self.version, self.path, self.fd = self._create()
        self.limit = self.ooms_before = None
        self.parent_fd = (None if self.path is None else
                          os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY))

    @staticmethod
    def _own(controller):
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if controller in ctrls.split(","):
                    return path
        return None

    def _create(self):
        name = f"passuntil-{os.getpid()}"
        return self._create_v2(name) or self._create_v1(name) or (0, None, None)

    def _create_v2(self, name):
        try:
            with open("/sys/fs/cgroup/cgroup.controllers") as f:
                if "memory" not in f.read().split():
                    return None
        except OSError:
            return None
        parent = "/sys/fs/cgroup" + (self._own("") or "/")
        # Maybe on already; refused where the parent holds processes and is not the root.
        with contextlib.suppress(OSError), open(parent + "/cgroup.subtree_control", "w") as f:
            f.write("+memory")
        path = os.path.join(parent, name)
        try:
            os.mkdir(path)
        except OSError:
            return None
        if os.path.exists(os.path.join(path, "memory.max")):
            return 2, path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        os.rmdir(path)
        return None

    def _create_v1(self, name):
        own, base = self._own("memory"), "/sys/fs/cgroup/memory"
        if own is None or not os.path.exists(os.path.join(base, "memory.limit_in_bytes")):
            return None
        path = os.path.normpath(base + own + "/" + name)
        try:
            os.mkdir(path)
        except OSError:
            return None
        return 1, path, os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def _write(self, name, value):
        fd = os.open(name, os.O_WRONLY, dir_fd=self.fd)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)

    def _read(self, name):
        fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        try:
            return os.read(fd, 1 << 16).decode()
        finally:
            os.close(fd)

    def prepare(self, mem_bytes):
        """Set the limit for the next check and reset the peak (the cgroup is empty now)."""
        if mem_bytes != self.limit:
            if self.version == 2:
                self._write("memory.max", mem_bytes)
                with contextlib.suppress(OSError):
                    self._write("memory.swap.max", 0)
            else:
                with contextlib.suppress(OSError):
                    self._write("memory.memsw.limit_in_bytes", -1)
                self._write("memory.limit_in_bytes", mem_bytes)
                with contextlib.suppress(OSError):
                    self._write("memory.memsw.limit_in_bytes", mem_bytes)
            self.limit = mem_bytes
        with contextlib.suppress(OSError):  # v2: resettable since Linux 6.12
            self._write("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes", 0)
        self.ooms_before = self._ooms()

    def join(self):
        self._write("cgroup.procs", 0)  # 0: the calling process

    def pids(self):
        return [int(p) for p in self._read("cgroup.procs").split()]

    def kill_all(self):
        if self.version == 2:
            with contextlib.suppress(OSError):
                self._write("cgroup.kill", 1)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _ooms(self):
        with contextlib.suppress(OSError):
            text = self._read("memory.events" if self.version == 2 else "memory.oom_control")
            for line in text.splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        return 0

    def usage(self):
        """(peak bytes of the check's whole process tree, OOM kills during the check)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            peak = int(self._read(name).strip())
        except (OSError, ValueError):
            peak = None
        return peak, self._ooms() - self.ooms_before

    def remove(self):
        if self.fd is not None:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.basename(self.path), dir_fd=self.parent_fd)
            os.close(self.parent_fd)
            self.fd = None
