"""The `safehold` command: `run` (API + worker, starting its own Redis) and client commands."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests import pg
from tests.conftest import PASSWORD_ENV, make_raw_config
from tests.helpers import write_toml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(base: str) -> None:
    """Poll /readyz until the server answers 200 (API up, a worker alive)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{base} never became ready")


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_run_starts_redis_and_backup_follow_shows_progress(
        pg_db: str, prefix: str, tmp_path: Path) -> None:
    """`safehold run` starts a private redis-server when none answers, serves API + worker;
    `safehold backup --follow` shows progress and ends with the finished job."""
    await pg.load_rich(pg_db)
    redis_port, api_port = free_port(), free_port()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["redis"]["url"] = f"redis://127.0.0.1:{redis_port}/0"
    raw["server"] = {"port": api_port}
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "--config", str(cfg), "run", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{api_port}"
    try:
        await wait_ready(base)
        rc, out, err = await cli("--config", str(cfg), "backup", "main", "--url", base,
                                 env=env)
        assert rc == 3 and "401 unauthorized" in err
        rc, out, err = await cli("--config", str(cfg), "token", "--role", "operator",
                                 "--ttl", "10m", env=env)
        assert rc == 0
        env["SAFEHOLD_TOKEN"] = out.strip()
        rc, out, err = await cli("--config", str(cfg), "backup", "main", "--follow",
                                 "--json", "--url", base, env=env)
        assert rc == 0, err
        job = json.loads(out)
        assert job["status"] == "succeeded"
        assert "dumping" in err  # the phase shown while following
        rc, out, _ = await cli("--config", str(cfg), "backups", "main", "--url", base, env=env)
        assert rc == 0 and job["result"]["filename"] in out
        rc, out, _ = await cli("--config", str(cfg), "jobs", "--url", base, env=env)
        assert rc == 0 and job["id"] in out and "succeeded" in out
        rc, _, err = await cli("--config", str(cfg), "backup", "nope", "--url", base, env=env)
        assert rc == 4 and "target_not_found" in err
    finally:
        server.terminate()
        _, server_err = await asyncio.wait_for(server.communicate(), 30)
    assert server.returncode == 0, server_err.decode()[-2000:]
    assert "starting" in server_err.decode() and "redis-server" in server_err.decode()
    # the private Redis went away with it
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0


async def test_config_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    """A bad config stops the command with exit code 2 and says what is wrong."""
    cfg = tmp_path / "safehold.toml"
    cfg.write_text('[targets.main]\nengine = "postgresql"\nurl = "postgresql://h/d"\n'
                   'password_env = "NOT_SET_ANYWHERE_42"\n')
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE_42"}
    rc, _, err = await cli("--config", str(cfg), "worker", env=env)
    assert rc == 2
    assert "NOT_SET_ANYWHERE_42" in err and "not set" in err


async def test_unreachable_redis_is_explained(tmp_path: Path, pg_db: str) -> None:
    """A worker pointed at a Redis that does not answer says so and how to fix it."""
    port = free_port()
    raw: dict[str, Any] = make_raw_config("x", tmp_path / "b", pg_db)
    raw["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
    for command in ("api", "worker"):
        rc, _, err = await cli("--config", str(cfg), command, env=env)
        assert rc == 2, (command, err)
        assert f"127.0.0.1:{port}" in err and "not reachable" in err
        assert "Traceback" not in err


async def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path, pg_db: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        raw: dict[str, Any] = make_raw_config("x", tmp_path / "b", pg_db)
        raw["server"]["port"] = port
        cfg = tmp_path / "safehold.toml"
        write_toml(cfg, raw)
        env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
        rc, _, err = await cli("--config", str(cfg), "api", env=env)
    assert rc == 2 and "already in use" in err and "Traceback" not in err, err


async def test_fresh_run_backs_up_the_bundled_example(prefix: str, tmp_path: Path) -> None:
    """With no config at all, `safehold run` creates the example SQLite database, and a
    backup of it succeeds — nothing needed but Redis (started on demand)."""
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "SAFEHOLD_CONFIG"}
    env.update(SAFEHOLD_SERVER_PORT=str(api_port), SAFEHOLD_REDIS_PREFIX=prefix,
               SAFEHOLD_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
               PYTHONPATH=str(REPO))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "run", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{api_port}"
    try:
        await wait_ready(base)
        async with aiohttp.ClientSession() as http:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "api.cli", "token", cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE)
            tok = (await proc.communicate())[0].decode().strip()
            async with http.post(f"{base}/api/v1/targets/example/backups?wait=30",
                                 headers={"Authorization": f"Bearer {tok}"}) as resp:
                job = await resp.json()
            # SQLite counts rows exactly: the ROWS column shows them, not blanks
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "api.cli", "stats", "example", cwd=tmp_path,
                env={**env, "SAFEHOLD_TOKEN": tok}, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            stats_out, stats_err = await proc.communicate()
    finally:
        server.terminate()
        _, err = await asyncio.wait_for(server.communicate(), 30)
    assert job["status"] == "succeeded", job
    assert job["result"]["filename"].startswith("backup_sqlite_")
    assert (tmp_path / "data" / "example.db").exists()
    assert (tmp_path / "backups" / "example" / job["result"]["filename"]).exists()
    assert "created the example SQLite database" in err.decode()
    table = stats_out.decode().splitlines()[1:]
    assert proc.returncode == 0 and table[0].split()[:2] == ["TABLE", "ROWS"], stats_err
    assert all(line.split()[1].isdigit() for line in table[1:]), stats_out


def test_global_options_also_work_after_the_subcommand() -> None:
    from api.cli.launcher import build_parser

    parser = build_parser()
    assert parser.parse_args(["worker", "--config", "b.toml"]).config == "b.toml"
    assert parser.parse_args(["--config", "a.toml", "worker"]).config == "a.toml"
    assert parser.parse_args(["backup", "t", "--config", "c.toml", "--follow"]).config == \
        "c.toml"
    args = parser.parse_args(["api", "--log-format", "json"])
    assert args.log_format == "json" and args.config is None


async def test_client_commands_as_a_person_and_a_script_use_them(
        pg_db: str, prefix: str, tmp_path: Path) -> None:
    """Every client command against a running server: tables and one-line results for a
    person, the API's JSON with --json; exit codes 0/1/2/3/4; destructive commands need
    --yes without a terminal; download resumes and checks the sha256; --follow under a
    pseudo-terminal draws a bar and ends with one line."""
    import pty

    await pg.load_rich(pg_db)
    conn = await pg.user_conn(pg_db)  # a value that would drive a terminal, if printed raw
    await conn.execute("CREATE TABLE esc (v text); INSERT INTO esc VALUES (E'\\x1b[2Jgone')")
    await conn.close()
    before = await pg.fingerprint(pg_db)
    api_port = free_port()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["server"] = {"port": api_port}
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
    env.pop("SAFEHOLD_TOKEN", None)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "--config", str(cfg), "run", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{api_port}"

    async def sh(*args: str, who: str | None = "admin") -> tuple[int, str, str]:
        e = dict(env)
        if who:
            e["SAFEHOLD_TOKEN"] = token_for[who]
        return await cli("--config", str(cfg), *args, "--url", base, env=e)

    try:
        await wait_ready(base)
        token_for = {}
        for role in ("admin", "viewer"):
            rc, out, _ = await cli("--config", str(cfg), "token", "--role", role, env=env)
            token_for[role] = out.strip()
        # `safehold token` without the server's config would sign with another key: it
        # says so instead of printing a token the server refuses as "unknown key"
        elsewhere = {k: v for k, v in env.items() if k != "SAFEHOLD_CONFIG"}
        rc, out, err = await cli("token", "--url", base, env=elsewhere)
        assert rc == 2 and out == "" and f"the server at {base}" in err, err
        rc, _, err = await sh("targets", who=None)
        assert rc == 3 and "SAFEHOLD_TOKEN" in err  # auth: exit 3, with the fix
        rc, out, _ = await sh("targets")
        assert rc == 0 and out.split()[:3] == ["TARGET", "ENGINE", "SCHEDULE"] and "main" in out
        rc, out, _ = await sh("targets", "--json")
        assert json.loads(out)["targets"][0]["id"] == "main"
        rc, out, _ = await sh("stats", "main")
        assert rc == 0 and "postgresql" in out and "everything" in out
        rc, _, err = await sh("backups", "nope")
        assert rc == 4 and "target_not_found" in err and "(configured: main)" in err
        rc, out, err = await sh("backup", "main", "--wait")
        assert rc == 0 and out.startswith("✓ backup backup_postgresql_") and "KiB in" in out, err
        name = out.split()[2]
        rc, out, _ = await sh("backups", "main", "--json")
        assert json.loads(out)["backups"][0]["filename"] == name
        rc, _, _ = await sh("backup", "main", who="viewer")
        assert rc == 3
        # a look inside the backup: a table's rows, control characters shown, never sent
        rc, out, err = await sh("contents", "main", name, "--table", "public.esc")
        assert rc == 0 and "\\x1b[2Jgone" in out and "\x1b" not in out, (out, err)
        assert "1 rows; the whole table read" in out
        rc, _, err = await sh("contents", "main", name, "--table", "public.esc", who="viewer")
        assert rc == 3
        rc, out, err = await sh("restore", "main", name, "--table", "public.esc", "--yes",
                                "--wait")
        assert rc == 0, err

        # download: into a directory that does not exist, a clear refusal (no traceback)
        rc, out, err = await sh("download", "main", name, "-o", str(tmp_path / "no/dir/x"))
        assert rc == 2 and "does not exist" in err and "Traceback" not in err, err
        # download: resumes a cut .part, then checks the sha256
        dest = tmp_path / "copy.sql.gz"
        rc, out, err = await sh("download", "main", name, "-o", str(dest))
        assert rc == 0 and "sha256 verified" in out, err
        whole = dest.read_bytes()
        dest.unlink()
        (tmp_path / "copy.sql.gz.part").write_bytes(whole[: len(whole) // 2])
        rc, out, _ = await sh("download", "main", name, "-o", str(dest), "--json")
        assert rc == 0 and dest.read_bytes() == whole
        assert json.loads(out)["sha256"] == hashlib.sha256(whole).hexdigest()
        (tmp_path / "copy.sql.gz.part").write_bytes(b"\0" * 10)  # a .part that lies
        dest.unlink()
        rc, _, err = await sh("download", "main", name, "-o", str(dest))
        assert rc == 1 and "checksum_mismatch" in err and not dest.exists()

        # upload, then a restore of it: refused without --yes (no TTY), done with it
        rc, out, err = await sh("upload", "main", str(tmp_path / "nope.gz"))
        assert rc == 2
        (tmp_path / "mine.sql.gz").write_bytes(whole)
        rc, out, err = await sh("upload", "main", str(tmp_path / "mine.sql.gz"), "--json")
        assert rc == 0, err
        uploaded = json.loads(out)["filename"]
        assert uploaded.startswith("upload_postgresql_")
        rc, _, err = await sh("restore", "main", uploaded)
        assert rc == 2 and "--yes" in err
        conn = await pg.user_conn(pg_db)
        await conn.execute("DROP TABLE everything CASCADE")
        await conn.close()
        rc, out, err = await sh("restore", "main", uploaded, "--yes", "--follow")
        assert rc == 0, err
        assert out.startswith(f"✓ restore {uploaded} in ") and "safety backup safety_" in out
        assert await pg.fingerprint(pg_db) == before

        # jobs, job, cancel (a finished job stays finished), audit, delete
        rc, out, _ = await sh("jobs", "--kind", "restore")
        assert rc == 0 and "restore" in out and "succeeded" in out
        job_id = out.splitlines()[1].split()[0]
        rc, out, _ = await sh("job", job_id)
        assert rc == 0 and out.startswith("✓ restore")
        rc, _, err = await sh("cancel", job_id)
        assert rc == 1 and "job_finished" in err and "already succeeded" in err
        rc, out, _ = await sh("verify", "main", "--wait")
        assert rc == 1 and out.startswith("✗ drill_unavailable")  # the role lacks CREATEDB
        rc, _, err = await sh("delete", "main", uploaded)
        assert rc == 2
        rc, out, _ = await sh("delete", "main", uploaded, "--yes")
        assert rc == 0 and out == f"✓ deleted {uploaded}\n"
        rc, out, _ = await sh("audit", "--limit", "100")
        assert rc == 0 and "delete_backup" in out and "create_restore" in out
        rc, _, err = await sh("job", "no-such-job")
        assert rc == 4

        # what a person sees: --follow with stderr on a terminal
        master, slave = pty.openpty()
        e = {**env, "SAFEHOLD_TOKEN": token_for["admin"], "TERM": "xterm"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "--config", str(cfg), "backup", "main",
            "--follow", "--url", base, cwd=REPO, env=e, stdin=slave, stdout=slave,
            stderr=slave)
        os.close(slave)
        screen = b""
        while True:
            try:
                chunk = await asyncio.to_thread(os.read, master, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        await proc.wait()
        os.close(master)
        text = screen.decode()
        assert proc.returncode == 0, text
        assert "· dumping" in text  # the phases as they happen, then a bar that completes
        assert "\x1b[K[" + "#" * 30 + "] 100.0%" in text
        last = text.strip().splitlines()[-1]
        assert last.startswith("✓ backup backup_postgresql_") and "(sha256 " in last
    finally:
        server.terminate()
        await asyncio.wait_for(server.communicate(), 30)


async def test_a_client_needs_a_url_and_a_token_only(
        pg_db: str, prefix: str, tmp_path: Path) -> None:
    """Issue 22, item 1: from the server's own directory, with none of the targets' secrets
    in the environment, client commands, `token` and `mcp` work; `safehold login` checks a
    token, stores it 0600 for its URL only, and a laptop then needs no variable at all."""
    from aiohttp import web

    api_port = free_port()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["server"] = {"port": api_port}
    write_toml(tmp_path / "safehold.toml", raw)
    server_env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "run", cwd=tmp_path, env=server_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{api_port}"
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    # an operator's shell: no database password, no SAFEHOLD_* at all
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAFEHOLD_") and k != PASSWORD_ENV}
    env.update(XDG_CONFIG_HOME=str(laptop / "config"), PYTHONPATH=str(REPO))

    async def run_in(cwd: Path, *args: str, stdin: bytes = b"",
                     extra: dict[str, str] | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", *args, cwd=cwd, env={**env, **(extra or {})},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    seen: list[str | None] = []

    async def capture(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"targets": []})

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"subject": "elsewhere", "role": "viewer", "targets": {}})

    other = web.Application()
    other.router.add_get("/api/v1/targets", capture)
    other.router.add_get("/api/v1/whoami", whoami)
    other_runner = web.AppRunner(other)
    await other_runner.setup()
    other_port = free_port()
    await web.TCPSite(other_runner, "127.0.0.1", other_port).start()
    try:
        await wait_ready(base)
        # in the server's directory: its safehold.toml gives the URL and the dev key
        rc, out, err = await run_in(tmp_path, "token", "--role", "operator")
        assert rc == 0 and out.count(".") == 2, err
        tok = out.strip()
        rc, out, err = await run_in(tmp_path, "targets", extra={"SAFEHOLD_TOKEN": tok})
        assert rc == 0 and "main" in out, err
        rc, out, err = await run_in(tmp_path, "stats", "main", extra={"SAFEHOLD_TOKEN": tok})
        assert rc == 0 and "postgresql" in out, err

        # login: a refused token is not stored
        rc, _, err = await run_in(laptop, "login", "--url", base, stdin=b"not.a.token\n")
        assert rc == 3 and "401" in err
        login_file = laptop / "config" / "safehold" / "login.json"
        assert not login_file.exists()
        rc, _, err = await run_in(laptop, "login", "--url", "ftp://x", stdin=tok.encode())
        assert rc == 2 and "base URL" in err
        rc, out, err = await run_in(laptop, "login", "--url", base + "/", stdin=tok.encode())
        assert rc == 0 and "logged in to" in out and "(operator;" in out, err
        assert "expires in" in err
        assert login_file.stat().st_mode & 0o777 == 0o600
        assert login_file.parent.stat().st_mode & 0o777 == 0o700
        assert tok not in out + err  # the token is never echoed
        # a laptop with no config and no variable: the stored login is enough
        rc, out, err = await run_in(laptop, "targets")
        assert rc == 0 and "main" in out, err
        rc, out, err = await run_in(laptop, "backup", "main", "--wait")
        assert rc == 0 and out.startswith("✓ backup backup_postgresql_"), err
        # MCP on stdio from the server's directory, without the password or a variable
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "mcp", cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stdin and proc.stdout
        proc.stdin.write(json.dumps({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "0"}}}).encode() + b"\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)
        info = json.loads(line)["result"]["serverInfo"]
        assert info["name"] == "safehold" and info["version"], info

        # the stored token goes to its own server only
        rc, _, err = await run_in(laptop, "targets",
                                  extra={"SAFEHOLD_URL": f"http://127.0.0.1:{other_port}"})
        assert rc == 0 and seen == [None], (seen, err)
        # a login file others can read is refused, not used
        login_file.chmod(0o644)
        rc, _, err = await run_in(laptop, "targets")
        assert rc == 2 and "readable by others" in err
        login_file.chmod(0o600)
        rc, out, _ = await run_in(laptop, "logout")
        assert rc == 0 and not login_file.exists()
        rc, _, err = await run_in(laptop, "targets", extra={"SAFEHOLD_URL": base})
        assert rc == 3 and "safehold login" in err
        # a login stored for another server, a production token in the environment: the
        # login's server gets the login's token, never the environment's
        elsewhere = f"http://127.0.0.1:{other_port}"
        rc, _, err = await run_in(laptop, "login", "--url", elsewhere, stdin=b"stored.tok.en\n")
        assert rc == 0, err
        seen.clear()
        rc, _, err = await run_in(laptop, "targets", extra={"SAFEHOLD_TOKEN": tok})
        assert rc == 0 and seen == ["Bearer stored.tok.en"], (seen, err)
    finally:
        await other_runner.cleanup()
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)


async def test_a_second_server_on_a_taken_port_starts_nothing(
        pg_db: str, prefix: str, tmp_path: Path) -> None:
    """Issue 22, item 3: `safehold run` binds its port first; when the port is taken it
    exits 2 before starting Redis or a worker (which would take jobs with its config)."""
    redis_port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
        raw["server"] = {"port": busy.getsockname()[1]}
        raw["redis"]["url"] = f"redis://127.0.0.1:{redis_port}/0"  # none there: would start
        write_toml(tmp_path / "safehold.toml", raw)
        env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
        rc, _, err = await cli("--config", str(tmp_path / "safehold.toml"), "run", env=env)
    assert rc == 2 and "already in use" in err and "Traceback" not in err, err
    assert "redis-server" not in err and "worker" not in err.lower(), err
    assert not (tmp_path / ".safehold-redis").exists()


async def _run_on_config(tmp_path: Path, raw: dict[str, Any]
                         ) -> tuple[Path, dict[str, str], asyncio.subprocess.Process]:
    """`safehold --config <file> run` on `raw` (the test role's password in the
    environment, no SAFEHOLD_TOKEN), its output in tmp_path/server.log."""
    cfg = tmp_path / "safehold.toml"
    write_toml(cfg, raw)
    env = {**os.environ, PASSWORD_ENV: pg.TEST_PASSWORD}
    env.pop("SAFEHOLD_TOKEN", None)
    with (tmp_path / "server.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "--config", str(cfg), "run", cwd=tmp_path,
            env=env, stdout=log, stderr=log)
    return cfg, env, server


async def test_operator_commands_and_a_reload_on_sighup(
        pg_db: str, prefix: str, tmp_path: Path) -> None:
    """Issue 22, item 5: `prune --dry-run` prints the plan and deletes nothing, `prune`
    asks, then deletes what the policy drops; `schedules`, `destinations`, `config check
    [--connect]`; SIGHUP with a broken config changes nothing, with a valid one the same
    process (same pid) serves the new config once running jobs are done."""
    import signal

    await pg.load_rich(pg_db)
    api_port = free_port()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["server"] = {"port": api_port}
    raw["targets"]["main"].update(schedule="0 3 * * *", retention={"keep_last": 1})
    cfg, env, server = await _run_on_config(tmp_path, raw)
    base = f"http://127.0.0.1:{api_port}"
    try:
        await wait_ready(base)
        rc, out, _ = await cli("--config", str(cfg), "token", env=env)
        e = {**env, "SAFEHOLD_TOKEN": out.strip()}

        async def sh(*args: str) -> tuple[int, str, str]:
            return await cli("--config", str(cfg), *args, env=e)

        names = []
        for _ in range(3):
            rc, out, err = await sh("backup", "main", "--wait")
            assert rc == 0, err
            names.append(out.split()[2])
        newest = names[-1]
        rc, out, err = await sh("prune", "main", "--dry-run")
        assert rc == 0, err
        assert out.splitlines()[0].split() == ["DESTINATION", "BACKUP", "ACTION", "WHY"]
        assert "would delete 2 backup(s)" in out and "keep_last=1" in out
        assert all(n in out for n in names)
        assert len(list((tmp_path / "backups" / "main").glob("backup_*.gz"))) == 3
        rc, _, err = await sh("prune", "main")  # no terminal: refuses without --yes
        assert rc == 2 and "--yes" in err
        rc, out, err = await sh("prune", "main", "--yes")
        assert rc == 0 and "deleted 2 backup(s)" in out, err
        left = [p.name for p in (tmp_path / "backups" / "main").glob("backup_*.gz")]
        assert left == [newest]

        rc, out, err = await sh("schedules")
        assert rc == 0, err
        row = out.splitlines()[1].split()
        assert row[0] == "main" and "0 3 * * *" in out and "keep_last=1" in out
        rc, out, err = await sh("schedules", "--json")
        assert json.loads(out)["schedules"][0]["next_run"]
        rc, out, err = await sh("destinations")
        assert rc == 0 and out.split()[:3] == ["DESTINATION", "TYPE", "WHERE"], err
        assert "local" in out and str(tmp_path / "backups") in out

        rc, out, err = await cli("--config", str(cfg), "config", "check", env=env)
        assert rc == 0 and "valid" in out and "target main: postgresql" in out, err
        rc, out, err = await cli("--config", str(cfg), "config", "check", "--connect",
                                 env=env)
        assert rc == 0 and "target main: reached" in out and "redis" in out, err
        down = tmp_path / "down.toml"  # a target whose server does not answer
        write_toml(down, make_raw_config(prefix, tmp_path / "backups", None))
        rc, out, err = await cli("--config", str(down), "config", "check", "--connect",
                                 env={**env, PASSWORD_ENV: "secret-password-xyz"})
        assert rc == 1 and "target main: NOT reached" in out, out
        assert "secret-password-xyz" not in out + err
        rc, _, err = await cli("--config", str(cfg), "config", "check",
                               env={k: v for k, v in env.items() if k != PASSWORD_ENV})
        assert rc == 2 and PASSWORD_ENV in err

        # SIGHUP: a broken config is refused, the server runs on unchanged
        good = cfg.read_text()
        cfg.write_text(good + "\n[nonsense]\nx = 1\n")
        server.send_signal(signal.SIGHUP)
        for _ in range(50):
            if "not reloaded" in (tmp_path / "server.log").read_text():
                break
            await asyncio.sleep(0.1)
        assert "unknown top-level key" in (tmp_path / "server.log").read_text()
        rc, out, _ = await sh("targets")
        assert rc == 0 and "second" not in out
        # a valid one: the same process restarts on it
        db2 = tmp_path / "second.db"
        raw["targets"]["second"] = {"engine": "sqlite", "path": str(db2)}
        import sqlite3
        with sqlite3.connect(db2) as conn:
            conn.execute("CREATE TABLE t (x)")
        write_toml(cfg, raw)
        server.send_signal(signal.SIGHUP)
        for _ in range(150):
            rc, out, _ = await sh("targets")
            if rc == 0 and "second" in out:
                break
            await asyncio.sleep(0.2)
        assert "second" in out, (tmp_path / "server.log").read_text()[-3000:]
        assert server.returncode is None  # the same pid, exec'ed
        rc, out, err = await sh("backup", "second", "--wait")
        assert rc == 0 and "backup_sqlite_" in out, err
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
    text = (tmp_path / "server.log").read_text()
    assert server.returncode == 0, text[-3000:]
    assert "restarting on it once running jobs finish" in text and "Traceback" not in text


async def test_the_api_answers_while_a_reload_waits_for_a_running_job(
        pg_db: str, prefix: str, tmp_path: Path) -> None:
    """Under `safehold run`, a SIGHUP restarts only once running jobs are done — and the
    API keeps answering meanwhile, so a client following the job sees it end instead of a
    refused connection for as long as the job runs (it used to stop at once)."""
    import signal

    conn = await pg.user_conn(pg_db)
    await conn.execute("CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('x', 400) "
                       "AS body FROM generate_series(1, 400000) g")  # ~170 MB: seconds
    await conn.close()
    api_port = free_port()
    raw = make_raw_config(prefix, tmp_path / "backups", pg_db)
    raw["server"] = {"port": api_port}
    cfg, env, server = await _run_on_config(tmp_path, raw)
    base = f"http://127.0.0.1:{api_port}"
    try:
        await wait_ready(base)
        rc, out, _ = await cli("--config", str(cfg), "token", env=env)
        auth = {"Authorization": f"Bearer {out.strip()}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            # the dump waits on a lock this test holds: running for as long as it says
            holder = await pg.user_conn(pg_db)
            lock = holder.transaction()
            await lock.start()
            await holder.execute("LOCK TABLE big IN ACCESS EXCLUSIVE MODE")
            async with http.post(f"{base}/api/v1/targets/main/backups") as resp:
                job = await resp.json()
            for _ in range(200):  # running, and past its start
                async with http.get(f"{base}/api/v1/jobs/{job['id']}") as resp:
                    now = await resp.json()
                if now["status"] == "running":
                    break
                await asyncio.sleep(0.05)
            assert now["status"] == "running", now
            await asyncio.sleep(0.5)
            server.send_signal(signal.SIGHUP)
            seen = []
            for _ in range(1200):  # answered while the job runs (the API goes down only
                try:               # once it has ended, for the restart)
                    async with http.get(f"{base}/api/v1/jobs/{job['id']}") as resp:
                        assert resp.status == 200
                        seen.append((await resp.json())["status"])
                except aiohttp.ClientConnectionError:
                    break
                if seen[-1] != "running":
                    break
                if seen.count("running") == 5:
                    await lock.rollback()  # the job may end now
                    await holder.close()
                await asyncio.sleep(0.1)
            if not holder.is_closed():
                await lock.rollback()
                await holder.close()
            # before the fix the API stopped at the signal: no answer during the drain
            assert seen.count("running") >= 3, seen
            await wait_ready(base)  # the new process serves, and says how the job ended
            async with http.get(f"{base}/api/v1/jobs/{job['id']}") as resp:
                assert (await resp.json())["status"] == "succeeded"
        text = (tmp_path / "server.log").read_text()
        assert "restarting on it once running jobs finish" in text
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
    assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
