"""A real, throw-away PostgreSQL server on loopback for the tests (Debian's `postgresql` package).

`initdb` a fresh cluster in a temp dir, start it with `pg_ctl` on a free port (TCP on 127.0.0.1 only, its
unix socket inside the temp dir, so it never meets a system cluster), create a password user and return
its URLs. PostgreSQL refuses to run as root, so under root the server runs as the `postgres` system user
that the Debian package creates. `.ci/run` installs the package; where it is missing the fixture skips
with the reason (set TUNELINE_REQUIRE_POSTGRES=1 to make that a failure instead, as CI does).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

USER, PASSWORD = "tuneline", "tuneline-test-pw"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    data_dir: Path

    def url(self, database: str, driver: str = "") -> str:
        """SQLAlchemy URL: driver '' (psycopg 3, Optuna) or 'asyncpg' (Prefect's server)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


def find_bindir() -> Path | None:
    """The server binaries: on PATH, else Debian's versioned /usr/lib/postgresql/<major>/bin (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    """PostgreSQL will not run as root: drop to the package's `postgres` user there."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def start(bindir: Path) -> PostgresServer:
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root but there is no `postgres` user to run the server as") from None
    base = Path(tempfile.mkdtemp(prefix="tuneline-pg-"))
    os.chmod(base, 0o755)  # the server user must reach its data dir below this root-owned temp dir
    data_dir, pwfile = base / "data", base / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(base, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    run = lambda argv: subprocess.run(_as_server_user(argv), check=True, capture_output=True, text=True)  # noqa: E731
    # Password (scram) on TCP like a production server; trust only on the private unix socket.
    run([str(bindir / "initdb"), "-D", str(data_dir), "-U", USER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
         "--auth-local=trust", "--encoding=UTF8", "--locale=C.UTF-8" if _has_c_utf8() else "--no-locale"])
    port = _free_port()
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    result = subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data_dir), "-o", options,
                                             "-l", str(base / "server.log"), "-w", "-t", "60", "start"]),
                            capture_output=True, text=True)
    if result.returncode != 0:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed ({result.returncode}): {result.stderr}\n{log[-2000:]}")
    return PostgresServer("127.0.0.1", port, USER, PASSWORD, data_dir)


def _has_c_utf8() -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.lower()
    return "c.utf8" in out or "c.utf-8" in out


def create_database(server: PostgresServer, name: str) -> str:
    """A fresh database on the server (each test gets its own); returns its psycopg URL."""
    import psycopg

    # autocommit: CREATE DATABASE cannot run inside a transaction
    with psycopg.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                         dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url(name)


def stop(server: PostgresServer) -> None:
    subprocess.run(_as_server_user([str(find_bindir() / "pg_ctl"), "-D", str(server.data_dir), "-m", "fast", "-w",
                                    "stop"]), capture_output=True, text=True, timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (server.data_dir / "postmaster.pid").exists():
        time.sleep(0.2)
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)
