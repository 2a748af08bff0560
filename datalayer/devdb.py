"""Embedded development PostgreSQL for ``datalayer dev-db start|stop|status|url``: the machine's
server binaries on a private cluster on 127.0.0.1 (trust auth, durability off), else the optional
``pgserver`` package. Nothing prints: functions return values or raise DevDBError."""

from __future__ import annotations

import hashlib
import importlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from datalayer.core.errors import DataLayerError

ENV_DIR = "DATALAYER_DEVDB_DIR"
DEV_USER = "datalayer-dev"
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
SERVER_SETTINGS = ("listen_addresses=127.0.0.1", "fsync=off", "synchronous_commit=off",
                   "full_page_writes=off", "shared_buffers=128MB", "max_connections=200")
NO_SERVER = ("no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL server "
             "binaries (e.g. apt-get install postgresql) or `pip install 'datalayer[embedded]'`")


class DevDBError(DataLayerError):
    """A dev-db operation failed; the message is written for the user."""


def default_root() -> Path:
    """``$DATALAYER_DEVDB_DIR`` when set, else ``<cwd>/.datalayer/devdb``; always absolute."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser().absolute() if env else Path.cwd() / ".datalayer" / "devdb"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _capture(cmd: list[str]) -> str:
    """Stripped stdout of cmd, or "" when it cannot run or fails."""
    try:  # fixed argv, no shell
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        return ""
    return run.stdout.strip()


def _has_tools(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()


def find_binaries() -> Path | None:
    """Directory holding initdb and pg_ctl: ``pg_config --bindir``, else the highest
    ``/usr/lib/postgresql/*/bin``, else the real (symlink-resolved) dir of ``initdb``."""
    pg_config = shutil.which("pg_config")
    if pg_config and (out := _capture([pg_config, "--bindir"])) and _has_tools(Path(out)):
        return Path(out)
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True,
                         key=lambda d: [int(x) for x in d.parent.name.split(".") if x.isdigit()]):
        if _has_tools(bindir):
            return bindir
    initdb = shutil.which("initdb")
    real = Path(initdb).resolve().parent if initdb else None
    return real if real and _has_tools(real) else None


def _has_pg_stat_statements(bindir: Path) -> bool:
    """True when the server's share dir ships the pg_stat_statements extension."""
    shares = [bindir.parent / "share" / "postgresql", bindir.parent / "share",
              Path("/usr/share/postgresql") / bindir.parent.name]
    for cfg in (str(bindir / "pg_config"), shutil.which("pg_config")):
        if cfg and Path(cfg).is_file() and (share := _capture([cfg, "--sharedir"])):
            shares.insert(0, Path(share))
            break
    return any((d / "extension" / "pg_stat_statements.control").is_file() for d in shares)


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    """cmd wrapped to run as ``user`` via runuser (else su); unchanged when user is None."""
    if user is None:
        return cmd
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser:
        return [runuser, "-u", user, "--", *cmd]
    return ["su", "-s", "/bin/sh", user, "-c", shlex.join(cmd)]


def _pick_port(stored: int) -> int:
    """``stored`` when 127.0.0.1 can still bind it, else a fresh free loopback port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", stored))  # port 0 asks the kernel for a free one
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class DevDB:
    """The development cluster under ``root``: ``data`` (cluster), ``port``, ``log``."""

    root: Path = field(default_factory=default_root)

    @property
    def data(self) -> Path:
        return self.root.absolute() / "data"

    @property
    def log_file(self) -> Path:
        return self.root.absolute() / "log"

    def socket_dir(self) -> Path:
        """``root/sock``, or ``/tmp/datalayer-devdb-<hash of root>`` when
        ``<dir>/.s.PGSQL.<port>`` would not fit a unix socket path (~100 bytes)."""
        local = self.root.absolute() / "sock"
        if len(str(local)) + len("/.s.PGSQL.65535") <= SOCKET_PATH_MAX:
            return local
        digest = hashlib.sha256(str(self.root.absolute()).encode()).hexdigest()[:16]
        return Path("/tmp") / f"datalayer-devdb-{digest}"  # noqa: S108 - ownership checked

    def start(self) -> str:
        """Start the cluster, running initdb first when there is none, and return its URL.
        Idempotent: when it already runs, return the running server's URL."""
        bindir = find_binaries()
        if bindir is None:
            return self._pgserver_uri()
        if self.is_running():
            return self._url()
        user, sock, port_file = self._user(), self.socket_dir(), self.root.absolute() / "port"
        self.root.absolute().mkdir(parents=True, exist_ok=True)
        sock.mkdir(mode=0o700, exist_ok=True)
        try:
            stored = int(port_file.read_text().strip())
        except (OSError, ValueError):
            stored = 0
        port = _pick_port(stored)
        port_file.write_text(f"{port}\n")
        owner = pwd.getpwnam(user).pw_uid if user else os.geteuid()
        if user is not None:
            self._hand_over(user, sock)
        if sock.lstat().st_uid != owner or sock.lstat().st_mode & 0o022:
            raise DevDBError(f"socket dir {sock} is not owned by uid {owner} or is group/world "
                             "writable; remove it and retry")
        if not (self.data / "PG_VERSION").exists():
            self._exec([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"],
                       user, "initdb")
        settings = [*SERVER_SETTINGS]
        if _has_pg_stat_statements(bindir):
            settings.append("shared_preload_libraries=pg_stat_statements")
        options = f"-p {port} -k {shlex.quote(str(sock))} " + " ".join(f"-c {s}" for s in settings)
        self._exec([str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_file),
                    "-w", "-t", "60", "-o", options, "start"], user, "pg_ctl start", log=True)
        return self._url()

    def stop(self) -> bool:
        """Stop the cluster (fast shutdown, waiting for it); False when it was not running."""
        bindir = find_binaries()
        if bindir is None and (pid := self._pgserver_pid()) is not None:
            os.kill(pid, signal.SIGINT)  # fast shutdown
            for _ in range(600):
                if self._pgserver_pid() is None:
                    return True
                time.sleep(0.1)
            raise DevDBError(f"the pgserver cluster (pid {pid}) did not stop within 60 s")
        if bindir is None or not self.is_running():
            return False
        self._exec([str(bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                    "-t", "60", "stop"], self._user(), "pg_ctl stop", log=True)
        return True

    def status(self) -> str:
        """``"running on PORT"``, ``"stopped"`` or ``"not initialised"``."""
        pgserver = find_binaries() is None
        cluster = self.root.absolute() / "pgserver" if pgserver else self.data
        if not (cluster / "PG_VERSION").exists():
            return "not initialised"
        if pgserver:
            return "running (pgserver)" if self._pgserver_pid() else "stopped"
        return f"running on {self._port()}" if self.is_running() else "stopped"

    def url(self) -> str | None:
        """The connection URL when the cluster is running, else None."""
        if find_binaries() is None:
            return self._pgserver_uri() if self._pgserver_pid() else None
        return self._url() if self.is_running() else None

    def is_running(self) -> bool:
        """True when a server runs on ``root/data`` (``pg_ctl status``)."""
        bindir = find_binaries()
        if bindir is None:
            return self._pgserver_pid() is not None
        if not (self.data / "PG_VERSION").exists():
            return False
        status = [str(bindir / "pg_ctl"), "status", "-D", str(self.data)]
        return self._exec(status, self._user(), "pg_ctl status", ok=(0, 3, 4)) == 0

    def _url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port()}/postgres"

    def _port(self) -> int:
        """Port of the server: line 4 of postmaster.pid, else ``root/port``."""
        for path, line in ((self.data / "postmaster.pid", 3), (self.root.absolute() / "port", 0)):
            try:
                return int(path.read_text().splitlines()[line])
            except (OSError, IndexError, ValueError):
                continue
        raise DevDBError(f"cannot tell the dev database port: no {self.root.absolute()}/port")

    def _user(self) -> str | None:
        """OS user that runs the server: None unless we are root; then the owner of the
        data dir, else ``postgres``, else ``datalayer-dev`` (created when missing)."""
        if os.geteuid() != 0:
            return None
        try:
            if (owner := self.data.stat().st_uid) != 0:
                return pwd.getpwuid(owner).pw_name
        except (OSError, KeyError):
            pass
        for name in ("postgres", DEV_USER):
            try:
                return pwd.getpwnam(name).pw_name
            except KeyError:
                continue
        useradd = shutil.which("useradd", path="/usr/sbin:/sbin:/usr/bin:/bin") or "useradd"
        self._exec([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    DEV_USER], None, "useradd")
        return DEV_USER

    def _hand_over(self, user: str, sock: Path) -> None:
        """Check ``user`` can traverse every parent of root; chown root's tree and sock to it."""
        entry = pwd.getpwnam(user)
        groups = set(os.getgrouplist(user, entry.pw_gid))
        for parent in reversed(self.root.absolute().parents):
            st = parent.stat()
            if not ((st.st_uid == entry.pw_uid and st.st_mode & stat.S_IXUSR)
                    or (st.st_gid in groups and st.st_mode & stat.S_IXGRP)
                    or st.st_mode & stat.S_IXOTH):
                raise DevDBError(
                    f"{parent} is not traversable by {user!r}, the unprivileged user that runs "
                    f"PostgreSQL when invoked as root: chmod o+x {parent}, or set {ENV_DIR} to "
                    "a directory under /tmp")
        for top in {self.root.absolute(), sock}:
            for dirpath, dirnames, filenames in os.walk(top):
                for path in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    if os.lstat(path).st_uid != entry.pw_uid:
                        os.lchown(path, entry.pw_uid, entry.pw_gid)

    def _exec(self, cmd: list[str], user: str | None, what: str,
              ok: tuple[int, ...] = (0,), log: bool = False) -> int:
        """Run cmd (as user) and return its exit code; DevDBError unless the code is in ok.
        The error is one line of reason, then the last 20 lines of the server log (when log)
        or of cmd's own output."""
        try:  # fixed argv, no shell
            run = subprocess.run(_as_user(cmd, user), capture_output=True, text=True,  # noqa: S603
                                 cwd="/", stdin=subprocess.DEVNULL, timeout=180)
            code, output = run.returncode, (run.stderr.strip() or run.stdout.strip()).splitlines()
        except (OSError, subprocess.TimeoutExpired) as exc:
            code, output = -1, [str(exc)]
        if code in ok:
            return code
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-20:] if log else []
        except OSError:
            tail = []
        fatal = [line for line in tail if "FATAL" in line or "PANIC" in line]
        reason = (fatal or output or ["no output"])[-1]
        tail = [f"--- last lines of {self.log_file} ---", *tail] if tail else output[-20:]
        raise DevDBError(f"{what} failed (exit {code}): {reason}" + "".join(f"\n{x}" for x in tail))

    def _pgserver_uri(self) -> str:
        """Start or attach to the ``pgserver`` cluster under root/pgserver; return its URI."""
        try:
            module = importlib.import_module("pgserver")
        except ImportError:
            raise DevDBError(NO_SERVER) from None
        self.root.absolute().mkdir(parents=True, exist_ok=True)
        try:
            server = module.get_server(str(self.root.absolute() / "pgserver"), cleanup_mode=None)
            return str(server.get_uri())
        except Exception as exc:
            raise DevDBError(f"pgserver failed to start the dev database: {exc}") from exc

    def _pgserver_pid(self) -> int | None:
        """PID of the live postmaster of the pgserver cluster, else None."""
        try:
            pid = int((self.root.absolute() / "pgserver" / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)  # raises unless the postmaster is alive
        except (OSError, ValueError, IndexError):
            return None
        return pid
