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

from api.cli.client import ApiError
from api.cli.commands import add_client_commands
from api.cli.login import (
    StoredLogin,
    bearer_token,
    normalize_url,
    plain_http_elsewhere,
    read_login,
    remove_login,
    save_login,
    server_url,
    token_expiry,
)
from shared.config import (
    ClientSettings,
    Settings,
    ensure_example_database,
    load_client_settings,
    load_settings,
)
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


def _listen(settings: Settings) -> list[socket.socket]:
    """The API's listening sockets (every address the host name has, as aiohttp's own
    TCPSite binds), bound before anything else starts (Redis, a worker): a second
    `safehold run` on a taken port stops here, having run nothing."""
    host, port = settings.server.host, settings.server.port
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, _, _, _, addr in dict.fromkeys((i[0], 0, 0, "", i[4]) for i in infos):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _serve_api(settings: Settings, stop: asyncio.Event,
                     socks: list[socket.socket]) -> None:
    from api.app import create_app

    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    for sock in socks:
        await web.SockSite(runner, sock).start()
    log.info("API listening on http://%s:%d (config: %s)", settings.server.host,
             settings.server.port, settings.source)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class StopEvent(asyncio.Event):
    """Set by SIGTERM/SIGINT, or SIGHUP with a valid new config; `reason` names the signal
    (said in the shutdown log)."""

    reason = "stop requested"


def _stop_event(settings: Settings) -> StopEvent:
    """SIGTERM/SIGINT stop (running jobs get the shutdown grace). SIGHUP reloads: the config
    is read again and, when valid, the process stops the same graceful way and starts again
    on it (main re-executes); when not, it says why and runs on with the config it has."""
    stop = StopEvent()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stop.reason = sig.name
        stop.set()

    def on_hangup() -> None:
        if stop.is_set():  # already stopping (SIGTERM, or a reload under way): no restart
            return
        path = None if settings.source.startswith("<") else settings.source
        try:
            load_settings(path, os.environ)
        except ConfigError as exc:
            log.error("SIGHUP: the config was not reloaded, it has an error (still running "
                      "on the one loaded at start): %s", exc.message)
            return
        log.warning("SIGHUP: the config is valid; restarting on it once running jobs finish")
        stop.reason = "SIGHUP"
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    _LAST_STOP.append(stop)
    return stop


_LAST_STOP: list[StopEvent] = []  # main reads whether a SIGHUP ended the serving


def _reexec_if_reloading() -> None:
    """After a SIGHUP stop: the same command again, on the config as it is now."""
    if _LAST_STOP and _LAST_STOP[-1].reason == "SIGHUP":
        log.warning("restarting: %s", " ".join(["safehold", *sys.argv[1:]]))
        sys.stdout.flush()
        sys.stderr.flush()
        # a second SIGHUP before the new process installs its handler must not kill it
        # (the ignore survives exec); the very command line it started with, flags included
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.execv(sys.executable, sys.orig_argv)


async def cmd_api(settings: Settings) -> None:
    from api.auth import check_dev_bind

    check_dev_bind(settings)
    await _serve_api(settings, _stop_event(settings), _listen(settings))


async def cmd_worker(settings: Settings) -> None:
    from shared.queue import connect

    pool = await connect(settings.redis.url)  # unreachable: one clear line, exit 2
    await pool.aclose()
    worker_main = importlib.import_module("worker.main")
    await worker_main.serve_worker(settings, _stop_event(settings))


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


async def cmd_config_check(settings: Settings, connect: bool) -> int:
    """What the config sets up, each part in one line; with `connect`, Redis and every
    target reached as a worker would. Exit 0 when all is well, 1 when something answered
    no (a config error never gets here: it is exit 2 with the key at fault)."""
    print(f"config {settings.source}: valid")
    print(f"  API on http://{settings.server.host}:{settings.server.port}, "
          + ("dev-mode tokens (local key " + settings.auth.dev_key_path + ")"
             if settings.auth.dev_mode else f"tokens from {settings.auth.issuer}"))
    print(f"  storage: local {settings.storage.path}"
          + "".join(f", {d.name} ({d.type})" for d in settings.destination_configs().values()
                    if d.name != "local"))
    for t in settings.targets.values():
        extras = [f"schedule {t.schedule} ({t.timezone})" if t.schedule else "no schedule",
                  "retention " + (", ".join(f"{k}={v}" for k, v in t.retention.public().items())
                                  if settings.retains(t) else "none (keeps everything)"),
                  "to " + ", ".join(t.destinations or ("local",))]
        if t.encryption is not None:
            extras.append("age-encrypted")
        print(f"  target {t.id}: {t.engine}; " + "; ".join(extras))
    for warning in settings.warnings:
        print(f"  warning: {warning}")
    if not connect:
        return 0
    from shared.queue import connect as redis_connect

    failed = 0
    try:
        pool = await redis_connect(settings.redis.url)
        await pool.aclose()
        print(f"  redis {urlsplit(settings.redis.url).hostname}: ok")
    except ConfigError as exc:
        failed += 1
        print(f"  redis: {exc.message}")
    runner = importlib.import_module("worker.runner")
    for tid, problem in await runner.check_targets(settings):
        failed += problem is not None
        print(f"  target {tid}: " + ("reached" if problem is None else f"NOT reached: {problem}"))
    return 1 if failed else 0


async def cmd_run(settings: Settings) -> None:
    """API + worker in one process (first run, small installs)."""
    from api.auth import check_dev_bind

    check_dev_bind(settings)
    socks = _listen(settings)  # the port first: a second instance runs nothing
    created = ensure_example_database(settings)
    if created:
        log.warning("no config file: created the example SQLite database %s (target "
                    "'example'); write a safehold.toml to back up your own", created)
    redis_proc = await ensure_local_redis(settings)
    worker_main = importlib.import_module("worker.main")
    stop = _stop_event(settings)
    api_stop = asyncio.Event()  # the API outlives the worker's drain (reload or stop):

    async def worker_then_api() -> None:  # clients follow the jobs to their end
        try:
            await worker_main.serve_worker(settings, stop)
        finally:
            api_stop.set()
    try:
        await asyncio.gather(_serve_api(settings, api_stop, socks), worker_then_api())
    finally:
        if redis_proc is not None and redis_proc.returncode is None:
            redis_proc.terminate()
            await redis_proc.wait()


# ---------------------------------------------------------------------- client
def _client_target(args: argparse.Namespace, settings: ClientSettings) -> tuple[str, str | None]:
    """The server a client command talks to and the token it sends there."""
    stored = read_login(os.environ)
    url = server_url(getattr(args, "url", None), os.environ, settings, stored)
    from_login = stored is not None and not getattr(args, "url", None) and \
        not os.environ.get("SAFEHOLD_URL")
    return url, bearer_token(url, os.environ, stored, url_from_login=from_login)


async def cmd_client(args: argparse.Namespace, settings: ClientSettings) -> int:
    from api.cli.client import Client
    from api.cli.commands import run

    url, token = _client_target(args, settings)
    async with Client(url, token) as c:
        return await run(c, args)


def parse_ttl(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"--ttl {text!r}: use e.g. 90s, 15m, 1h, 7d") from None


def cmd_token(args: argparse.Namespace, settings: ClientSettings) -> int:
    """Dev mode: print a token signed with the local key (the API verifies it like any)."""
    from api.auth import mint_dev_token

    if not settings.auth.dev_mode:
        raise ConfigError("an [auth] issuer is configured: get tokens from it, not from "
                          "`safehold token` (that is for dev mode only)")
    roles = [args.role] if args.role != "none" else []
    roles += [f"{r}:{t}" for r, t in (s.split(":", 1) for s in args.scoped)]
    url = args.url or os.environ.get("SAFEHOLD_URL") or \
        f"http://{settings.server.host}:{settings.server.port}"
    mismatch = _server_key_mismatch(url.rstrip("/"), settings.auth.dev_key_path)
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


def _read_token_for_login(url: str) -> str:
    """The token to store: piped on stdin, else $SAFEHOLD_TOKEN, else asked (not echoed)."""
    import getpass

    if not sys.stdin.isatty():
        token = sys.stdin.readline().strip()
    elif os.environ.get("SAFEHOLD_TOKEN"):
        token = os.environ["SAFEHOLD_TOKEN"]
    else:
        token = getpass.getpass(f"bearer token for {url} (input hidden): ").strip()
    if not token:
        raise ConfigError("no token given: pipe one in (`… | safehold login --url URL`), "
                          "set SAFEHOLD_TOKEN, or paste it at the prompt")
    return token


async def cmd_login(args: argparse.Namespace) -> int:
    """Check a token against the server (whoami), then store URL and token, 0600."""
    import time

    from api.cli.client import Client

    url = normalize_url(args.url)
    if plain_http_elsewhere(url):  # said before the token is sent anywhere
        print(f"warning: {url} is plain http to another machine: the token crosses the "
              "network in clear text; put the server behind TLS", file=sys.stderr)
    token = _read_token_for_login(url)
    async with Client(url, token) as c:
        me = await c.call("GET", "/api/v1/whoami")
    path = save_login(os.environ, StoredLogin(url=url, token=token))
    role = me.get("role") or "no global role"
    scoped = ", ".join(f"{t}: {r}" for t, r in sorted((me.get("targets") or {}).items()))
    print(f"logged in to {url} as {me.get('subject')} ({role}; targets: {scoped or 'none'}); "
          f"stored in {path}")
    exp = token_expiry(token)
    if exp is not None:
        left = exp - time.time()
        print(f"the token expires in {left / 3600:.1f} h: log in again then", file=sys.stderr)
    return 0


def cmd_logout() -> int:
    path = remove_login(os.environ)
    print(f"removed {path}" if path else "not logged in (no stored login)")
    return 0


def cmd_mcp(args: argparse.Namespace, settings: ClientSettings) -> int:
    import anyio

    from api.cli.mcp_stdio import bridge

    url, token = _client_target(args, settings)
    if not token:
        print("safehold mcp: set SAFEHOLD_TOKEN (a bearer token for the Safehold server) "
              "or run `safehold login --url URL` first", file=sys.stderr)
        return 3
    anyio.run(bridge, url, token)
    return 0


def cmd_restore_cluster(args: argparse.Namespace) -> int:
    """`safehold pitr restore-cluster`: runs here, with the config's storage credentials
    (loaded by name, like the worker: `api` never imports `worker`)."""
    if not args.to or not args.data_dir:
        print("safehold: pitr restore-cluster needs --to T (an instant, or latest) and "
              "--data-dir D", file=sys.stderr)
        return 2
    settings = load_settings(args.config, os.environ)
    cluster = importlib.import_module("worker.cluster_restore")
    asyncio.run(cluster.restore_cluster(settings, args.target, args.to, Path(args.data_dir),
                                        pg_bindir=args.pg_bindir, owner=args.owner))
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
                             "(token from $SAFEHOLD_TOKEN or the stored login)")
    mp.add_argument("--url", help="API base URL (default: $SAFEHOLD_URL, the stored login "
                                  "or the config)")
    cp = sub.add_parser("config", parents=[common],
                        help="check the config as `api`/`worker` would load it (secrets "
                             "resolved), and say what it configures")
    cp.add_argument("action", choices=["check"])
    cp.add_argument("--connect", action="store_true",
                    help="also reach Redis and every target with its credentials")
    lp = sub.add_parser("login", parents=[common],
                        help="check a bearer token against a server and store URL and token "
                             "(0600, in ~/.config/safehold) for the client commands")
    lp.add_argument("--url", required=True, help="the server's base URL")
    sub.add_parser("logout", parents=[common], help="remove the stored login")
    add_client_commands(sub, common)
    return p


SERVER_COMMANDS = ("api", "worker", "run", "config")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    port = "the port"
    try:
        if args.command == "pitr" and args.action == "restore-cluster":
            return cmd_restore_cluster(args)
        if args.command not in SERVER_COMMANDS:
            return _client_main(args)
        settings = load_settings(args.config, os.environ)
        port = f"{settings.server.host}:{settings.server.port}"
        for warning in settings.warnings:
            log.warning("%s", warning)
        if args.command == "api":
            asyncio.run(cmd_api(settings))
        elif args.command == "worker" and args.check:
            return asyncio.run(cmd_worker_check(settings))
        elif args.command == "worker":
            asyncio.run(cmd_worker(settings))
        elif args.command == "config":
            return asyncio.run(cmd_config_check(settings, args.connect))
        else:
            asyncio.run(cmd_run(settings))
        _reexec_if_reloading()
    except ConfigError as exc:
        print(f"safehold: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except SafeholdError as exc:
        print(f"safehold: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"safehold: {port} is already in use (another Safehold?); set [server] port "
              "or SAFEHOLD_SERVER_PORT", file=sys.stderr)
        return 2
    return 0


def _client_main(args: argparse.Namespace) -> int:
    """Client commands: a URL and a token, never a target's secrets."""
    try:
        if args.command == "login":
            return asyncio.run(cmd_login(args))
        if args.command == "logout":
            return cmd_logout()
        settings = load_client_settings(args.config, os.environ)
        if args.command == "token":
            return cmd_token(args, settings)
        if args.command == "mcp":
            return cmd_mcp(args, settings)
        return asyncio.run(cmd_client(args, settings))
    except ApiError as exc:
        hint = ""
        if exc.http_status == 401 and not os.environ.get("SAFEHOLD_TOKEN"):
            hint = (" (set SAFEHOLD_TOKEN or run `safehold login --url URL`; in dev mode "
                    "`safehold token` prints one)")
        print(f"safehold: {exc.message}{hint}", file=sys.stderr)
        return exc.exit_code
    except aiohttp.ClientConnectionError as exc:
        print(f"safehold: cannot reach the API: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
