"""A throwaway PostgreSQL server for tests and benchmarks, plus a harness that runs N capture proxies into one store.

    with PgServer.start() as server:          # initdb + pg_ctl in a temp dir, 127.0.0.1, a free port
        url = server.new_database()           # postgresql://slm@127.0.0.1:PORT/db_1, empty

The binaries come from PATH or Debian's /usr/lib/postgresql/VERSION/bin (`apt-get install postgresql`; .ci/run
installs it). PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user via runuser.
``PgServer.start()`` raises ``PgUnavailable`` (tests skip with its reason) when binaries or psycopg are missing.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from stub_llm import free_port, wait_http  # noqa: E402


class PgUnavailable(RuntimeError):
    pass


def find_bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


class PgServer:
    def __init__(self, bin_dir: Path, base: Path, port: int, as_user: str | None):
        self.bin_dir, self.base, self.port, self.as_user = bin_dir, base, port, as_user
        self.data = base / "data"
        self._databases = 0

    @classmethod
    def start(cls, *, fsync: bool = False, max_connections: int = 100) -> "PgServer":
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise PgUnavailable("psycopg is not installed (pip install 'slmigrate[postgres]')") from exc
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PgUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                                "/usr/lib/postgresql/*/bin; install the Debian package `postgresql`")
        as_user = None
        if os.geteuid() == 0:
            as_user = "postgres"
            try:
                import pwd

                pw = pwd.getpwnam(as_user)
            except KeyError as exc:
                raise PgUnavailable("running as root and there is no `postgres` user to run the server as") from exc
        base = Path(tempfile.mkdtemp(prefix="slmigrate-pg-"))
        if as_user:
            os.chown(base, pw.pw_uid, pw.pw_gid)
        server = cls(bin_dir, base, free_port(), as_user)
        try:
            server._run(["initdb", "-D", str(server.data), "-U", "slm", "--auth=trust", "-E", "UTF8",
                         "--locale=C", "--no-sync", "--no-instructions"])
            options = (f"-p {server.port} -k {base} -c listen_addresses=127.0.0.1 "
                       f"-c max_connections={max_connections} -c fsync={'on' if fsync else 'off'}")
            server._run(["pg_ctl", "-D", str(server.data), "-l", str(base / "server.log"), "-o", options,
                         "-w", "-t", "60", "start"])
        except Exception as exc:
            log = base / "server.log"
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(base, ignore_errors=True)
            raise PgUnavailable(f"could not start a PostgreSQL server: {exc} {detail}") from exc
        return server

    def _run(self, argv: list[str]) -> None:
        argv = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_user:
            argv = ["runuser", "-u", self.as_user, "--", *argv]
        # Output to a file, never a pipe: a server started by pg_ctl inherits it and would hold a pipe open.
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=self.base)
            if done.returncode != 0:
                out.seek(0)
                raise RuntimeError(f"{' '.join(argv)} failed: {out.read().strip()}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://slm@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database on this server; its URL."""
        import psycopg

        self._databases += 1
        name = f"db_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"])
        except Exception:
            pass
        shutil.rmtree(self.base, ignore_errors=True)

    def restart(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-m", "fast", "-w",
                   "restart"])

    def __enter__(self) -> "PgServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- N real `slmigrate collect proxy` processes into one store, driven concurrently ---

def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def text_of(proxy: int, i: int) -> str:
    return f"proxy {proxy} call {i}: what is the status of order {proxy * 1_000_000 + i}?"


def run_proxies(store: str, workdir: Path, *, proxies: int = 4, calls: int = 20_000,
                concurrency: int = 16) -> dict[str, Any]:
    """Start the stub LLM and ``proxies`` `slmigrate collect proxy` processes logging into ``store``; send
    ``calls`` chat completions spread evenly over them at once (``concurrency`` in flight per proxy); stop the
    proxies with SIGTERM (they drain) and return timings, every answer's check and each proxy's final counters.
    ``upstream_failures`` lists the 5xx answers (the proxy logs those exchanges too, as error calls) that were
    retried; on an overloaded box the stub sometimes drops a pooled connection."""
    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMIGRATE_ENCRYPTION_KEY": ""}
    stub_port = free_port()
    procs: list[subprocess.Popen] = []
    stub = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stub_llm.py"), "--port", str(stub_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_http(f"http://127.0.0.1:{stub_port}/v1/models", stub)
        ports = [free_port() for _ in range(proxies)]
        for k, port in enumerate(ports):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "slmigrate", "collect", "proxy", "--upstream",
                 f"http://127.0.0.1:{stub_port}/v1", "--port", str(port), "--agent", f"proxy-{k}",
                 "--workspace", str(workdir / f"ws{k}"), "--store", store, "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir))
        for port, proc in zip(ports, procs):
            wait_http(f"http://127.0.0.1:{port}/slmigrate/health", proc)

        per_proxy = calls // proxies
        wrong: list[str] = []
        failures: list[str] = []
        transport_errors: list[str] = []
        cpu0 = os.times()

        async def drive(k: int, port: int) -> float:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", limits=limits,
                                         timeout=120, headers={"Authorization": "Bearer sk-test"}) as client:
                queue = list(range(per_proxy))

                async def worker() -> None:
                    while queue:
                        i = queue.pop()
                        text = text_of(k, i)
                        body = {"model": "stub", "messages": [{"role": "user", "content": text}]}
                        # Like the openai SDK, retry a 5xx or a broken connection. A 5xx came from the proxy
                        # (the upstream failed) and was logged as an error call: counted, so the rows add up.
                        for _attempt in range(5):
                            try:
                                response = await client.post("/chat/completions", json=body)
                            except httpx.HTTPError as exc:
                                transport_errors.append(f"{text} -> {type(exc).__name__}: {exc}")
                                continue
                            if response.status_code >= 500:
                                failures.append(f"{text} -> HTTP {response.status_code} {response.text[:300]}")
                                continue
                            try:
                                ok = response.json()["choices"][0]["message"]["content"] == "Echo: " + text
                            except (ValueError, KeyError, IndexError, TypeError):
                                ok = False
                            if not ok:
                                wrong.append(f"{text} -> HTTP {response.status_code} {response.text[:300]}")
                            break
                        else:
                            wrong.append(f"{text} -> no answer after 5 attempts")

                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                return time.perf_counter() - start

        async def drive_all() -> list[float]:
            return await asyncio.gather(*(drive(k, port) for k, port in enumerate(ports)))

        start = time.perf_counter()
        per_proxy_s = asyncio.run(drive_all())
        wall = time.perf_counter() - start
        client_cpu = sum(os.times()[:2]) - sum(cpu0[:2])
        proxy_cpu = [_cpu_seconds(proc.pid) for proc in procs]  # includes start-up (~1-2 s of imports each)
        stats = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"proxy exited {proc.returncode}: {err[-2000:]}")
            stats.append(json.loads(out))
        drained = time.perf_counter() - start
        return {"calls": per_proxy * proxies, "per_proxy": per_proxy, "wall_s": wall, "drained_s": drained,
                "per_proxy_s": per_proxy_s, "wrong_answers": wrong, "upstream_failures": failures,
                "transport_errors": transport_errors, "proxy_stats": stats, "client_cpu_s": client_cpu,
                "proxy_cpu_s": proxy_cpu, "stub_cpu_s": _cpu_seconds(stub.pid)}
    finally:
        for proc in [*procs, stub]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
