"""`safehold` — run the API and/or a worker, or act as a client of a running API.

A thin adapter: parse arguments, build Settings, call the same code the API calls.
The worker is loaded by name (`worker.main`), like arq's own CLI does, so `api` never
imports `worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from api.client import ApiError
from api.commands import add_client_commands
from shared.config import Settings, ensure_example_database, load_settings
from shared.errors import ConfigError, SafeholdError

log = logging.getLogger("safehold")


# ---------------------------------------------------------------------- servers
def _setup_logging(level: str, fmt: str = "text") -> None:
    from shared import logs

    logs.setup(level, fmt)


def _redis_host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 6379


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


async def ensure_local_redis(settings: Settings) -> asyncio.subprocess.Process | None:
    """Start a private redis-server when none answers at a loopback URL (first-run help)."""
    host, port = _redis_host_port(settings.redis.url)
    if _answers(host, port):
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None  # not ours to start: the connect step reports it clearly
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            f"no Redis answers at {host}:{port} and redis-server is not installed. Install "
            "it (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`) "
            "or point SAFEHOLD_REDIS_URL at a running Redis."
        )
    data_dir = Path(settings.storage.path).parent / ".safehold-redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    log.warning("no Redis at %s:%d; starting %s there (data in %s)", host, port, binary,
                data_dir)
    proc = await asyncio.create_subprocess_exec(
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
        "--save", "60 1", "--appendonly", "no", stdout=asyncio.subprocess.DEVNULL)
    for _ in range(50):
        if _answers(host, port):
            return proc
        await asyncio.sleep(0.1)
    proc.terminate()
    raise ConfigError(f"started redis-server on port {port} but it does not answer")


async def _serve_api(settings: Settings, stop: asyncio.Event) -> None:
    from api.app import create_app
    from api.auth import check_dev_bind

    check_dev_bind(settings)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    log.info("API listening on http://%s:%d (config: %s)", settings.server.host,
             settings.server.port, settings.source)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class StopEvent(asyncio.Event):
    """Set by SIGTERM/SIGINT; `reason` names the signal (said in the shutdown log)."""

    reason = "stop requested"


def _stop_event() -> StopEvent:
    stop = StopEvent()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stop.reason = sig.name
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def cmd_api(settings: Settings) -> None:
    await _serve_api(settings, _stop_event())


async def cmd_worker(settings: Settings) -> None:
    from shared.queue import connect

    pool = await connect(settings.redis.url)  # unreachable: one clear line, exit 2
    await pool.aclose()
    worker_main = importlib.import_module("worker.main")
    await worker_main.serve_worker(settings, _stop_event())


async def cmd_worker_check(settings: Settings) -> int:
    """A worker process on this host (its id starts with the host name: the container's
    own, in Docker) announced itself in the last 30 s."""
    import time

    from shared.keys import Keys
    from shared.queue import connect

    pool = await connect(settings.redis.url)
    try:
        since = time.time() - 30
        live = [w.decode() for w in await pool.zrangebyscore(
            Keys(settings.redis.prefix).workers, since, "+inf")]
    finally:
        await pool.aclose()
    mine = [w for w in live if w.split(":", 1)[0] == socket.gethostname()]
    if mine:
        print(f"ok: {len(mine)} live worker(s) on {socket.gethostname()}")
        return 0
    print(f"unhealthy: no worker on {socket.gethostname()} heartbeated in the last 30 s "
          f"({len(live)} elsewhere)", file=sys.stderr)
    return 1


async def cmd_run(settings: Settings) -> None:
    """API + worker in one process (first run, small installs)."""
    created = ensure_example_database(settings)
    if created:
        log.warning("no config file: created the example SQLite database %s (target "
                    "'example'); write a safehold.toml to back up your own", created)
    redis_proc = await ensure_local_redis(settings)
    worker_main = importlib.import_module("worker.main")
    stop = _stop_event()
    try:
        await asyncio.gather(_serve_api(settings, stop), worker_main.serve_worker(settings, stop))
    finally:
        if redis_proc is not None and redis_proc.returncode is None:
            redis_proc.terminate()
            await redis_proc.wait()


# ---------------------------------------------------------------------- client
async def cmd_client(args: argparse.Namespace, settings: Settings) -> int:
    from api.client import Client
    from api.commands import run

    token = os.environ.get("SAFEHOLD_TOKEN")
    async with Client(api_base(args, settings), token) as c:
        return await run(c, args)


def parse_ttl(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"--ttl {text!r}: use e.g. 90s, 15m, 1h, 7d") from None


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    """Dev mode: print a token signed with the local key (the API verifies it like any)."""
    from api.auth import mint_dev_token

    if not settings.auth.dev_mode:
        raise ConfigError("an [auth] issuer is configured: get tokens from it, not from "
                          "`safehold token` (that is for dev mode only)")
    roles = [args.role] if args.role != "none" else []
    roles += [f"{r}:{t}" for r, t in (s.split(":", 1) for s in args.scoped)]
    mismatch = _server_key_mismatch(api_base(args, settings), settings.auth.dev_key_path)
    if mismatch:
        print(f"safehold token: {mismatch}", file=sys.stderr)
        return 2
    print(mint_dev_token(settings.auth, roles, ttl=parse_ttl(args.ttl), subject=args.subject))
    return 0


def _server_key_mismatch(base: str, key_path: str) -> str | None:
    """If a Safehold server answers at `base`, the reason a token signed with the key at
    `key_path` would be refused there (another key, or none yet here), else None."""
    import urllib.request

    from api.auth import _kid, load_or_create_dev_key

    try:
        with urllib.request.urlopen(f"{base}/.well-known/jwks.json", timeout=2) as resp:
            kids = {k.get("kid") for k in json.load(resp).get("keys", [])}
    except (OSError, ValueError):
        return None  # no server there (or not in dev mode): nothing to disagree with
    if not Path(key_path).exists():
        return (f"the server at {base} signs with its own key, and there is no key at "
                f"{key_path}: run this with the server's config (--config) or from its "
                "directory, so both use one key")
    if _kid(load_or_create_dev_key(key_path)) not in kids:
        return (f"the key at {key_path} is not the one the server at {base} uses: its "
                "tokens would be refused (unknown key). Run this with the server's config "
                "(--config) or from its directory")
    return None


def api_base(args: argparse.Namespace, settings: Settings) -> str:
    return args.url or os.environ.get("SAFEHOLD_URL") or \
        f"http://{settings.server.host}:{settings.server.port}"


def cmd_mcp(args: argparse.Namespace, settings: Settings) -> int:
    import anyio

    from api.mcp_stdio import bridge

    token = os.environ.get("SAFEHOLD_TOKEN")
    if not token:
        print("safehold mcp: set SAFEHOLD_TOKEN (a bearer token for the Safehold server)",
              file=sys.stderr)
        return 3
    anyio.run(bridge, api_base(args, settings), token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safehold", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file (default: $SAFEHOLD_CONFIG or ./safehold.toml)")
    p.add_argument("--log-level", default=os.environ.get("SAFEHOLD_LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=("text", "json"),
                   default=os.environ.get("SAFEHOLD_LOG_FORMAT", "text"),
                   help="text (default) or one JSON object per line, with job and request "
                        "ids")
    sub = p.add_subparsers(dest="command", required=True)
    # the global options also work after the subcommand (`safehold worker --config x.toml`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub.add_parser("api", help="run the HTTP API", parents=[common])
    wp = sub.add_parser("worker", help="run a worker", parents=[common])
    wp.add_argument("--check", action="store_true",
                    help="health check: exit 0 if a worker on this host heartbeated in the "
                         "last 30 s (a container's health check), else 1")
    sub.add_parser("run", help="run API + worker in one process (starts Redis if needed)",
                   parents=[common])
    tp = sub.add_parser("token", help="dev mode: print a bearer token signed by the local key",
                        parents=[common])
    tp.add_argument("--role", choices=["viewer", "operator", "admin", "none"],
                    default="admin", help="global role (none: only --scoped roles)")
    tp.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default 1h)")
    tp.add_argument("--subject", default=os.environ.get("USER", "dev"))
    tp.add_argument("--scoped", action="append", default=[], metavar="ROLE:TARGET",
                    help="an extra role on one target only, e.g. operator:main")
    tp.add_argument("--url", help="the server whose key must match (default: $SAFEHOLD_URL "
                                  "or the config)")
    mp = sub.add_parser("mcp", parents=[common],
                        help="an MCP server on stdio, bridged to the Safehold server's /mcp "
                             "(token from $SAFEHOLD_TOKEN)")
    mp.add_argument("--url", help="API base URL (default: $SAFEHOLD_URL or the config)")
    add_client_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        settings = load_settings(args.config, os.environ)
        for warning in settings.warnings:
            log.warning("%s", warning)
        if args.command == "token":
            return cmd_token(args, settings)
        if args.command == "api":
            asyncio.run(cmd_api(settings))
        elif args.command == "worker" and args.check:
            return asyncio.run(cmd_worker_check(settings))
        elif args.command == "worker":
            asyncio.run(cmd_worker(settings))
        elif args.command == "run":
            asyncio.run(cmd_run(settings))
        elif args.command == "mcp":
            return cmd_mcp(args, settings)
        else:
            return asyncio.run(cmd_client(args, settings))
    except ConfigError as exc:
        print(f"safehold: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except ApiError as exc:
        hint = ""
        if exc.http_status == 401 and not os.environ.get("SAFEHOLD_TOKEN"):
            hint = " (set SAFEHOLD_TOKEN; in dev mode `safehold token` prints one)"
        print(f"safehold: {exc.message}{hint}", file=sys.stderr)
        return exc.exit_code
    except SafeholdError as exc:
        print(f"safehold: {exc.message}", file=sys.stderr)
        return 1
    except aiohttp.ClientConnectionError as exc:
        print(f"safehold: cannot reach the API: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"safehold: {settings.server.host}:{settings.server.port} is already in use "
              "(another Safehold?); set [server] port or SAFEHOLD_SERVER_PORT",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
