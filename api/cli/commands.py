"""The CLI's client commands: each is one or two API calls and a rendering (a table or
one line for a person, the API's JSON with `--json`). Destructive commands (restore,
delete) ask on a terminal and need `--yes` otherwise."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlencode

from api.cli.client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ApiDoc,
    Client,
    final_line,
    mib,
    render_progress,
)
from shared.jobs import TERMINAL, JobStatus

JOB_WAIT = 3600


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        common: argparse.ArgumentParser) -> None:
    """The client subcommands, each with --url and --json."""
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--url", help="API base URL (default: $SAFEHOLD_URL or the config)")
    client.add_argument("--json", action="store_true", help="print the API's JSON")

    def cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, parents=[client], help=help_text)
        return parser

    cmd("targets", "the configured targets")
    cmd("stats", "a target's database size, tables, server version").add_argument("target")
    cmd("backups", "a target's backups, newest first").add_argument("target")
    ct = cmd("contents", "what a backup holds (tables and their rows, as recorded when it "
                         "was made; nothing is read from the backup)")
    ct.add_argument("target")
    ct.add_argument("backup")
    ct.add_argument("--table", help="show this table's rows, read from the backup itself "
                                    "(operator; audited)")
    ct.add_argument("--where", metavar="COLUMN=VALUE", help="with --table: matching rows only")
    ct.add_argument("--limit", type=int, default=50, help="with --table: rows at most")
    b = cmd("backup", "start a backup")
    b.add_argument("target")
    b.add_argument("--no-compress", action="store_true")
    b.add_argument("--note")
    r = cmd("restore", "restore a backup over the target (a safety backup is taken first)")
    r.add_argument("target")
    r.add_argument("backup")
    r.add_argument("--no-safety-backup", action="store_true")
    r.add_argument("--roles", choices=("create", "map", "skip"),
                   help="PostgreSQL, MySQL: roles/accounts the backup names that the server "
                        "lacks are created (as its globals describe them), renamed "
                        "(--owner-map, PostgreSQL) or their owners and grants left out")
    r.add_argument("--database", help="a server target's backup set: restore only this "
                                      "database of it")
    _scope_options(r)
    r.add_argument("--key", action="append", metavar="PATTERN", dest="keys",
                   help="Redis: only the keys this glob pattern matches (repeat)")
    r.add_argument("--schema", action="append", metavar="SCHEMA", dest="schemas",
                   help="every table of this schema the backup holds (repeat; PostgreSQL)")
    r.add_argument("--owner-map", action="append", metavar="OLD=NEW", default=[],
                   help="with --roles map: give OLD's objects and grants to NEW (repeat)")
    r.add_argument("--terminate-connections", action="store_true",
                   help="PostgreSQL, MySQL: end the application's sessions on the database "
                        "instead of waiting (lock_timeout) for their locks")
    r.add_argument("--identity-file", metavar="KEY",
                   help="age identity that decrypts an encrypted backup (when the worker "
                        "has no encryption.identity_file)")
    r.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")
    up = cmd("upload", "upload a backup file (validated before it is listed)")
    up.add_argument("target")
    up.add_argument("file")
    up.add_argument("--restore", action="store_true", help="restore it right after")
    up.add_argument("--no-safety-backup", action="store_true")
    up.add_argument("--yes", action="store_true", help="with --restore: do not ask")
    dl = cmd("download", "download a backup (resumable; sha256 checked)")
    dl.add_argument("target")
    dl.add_argument("backup")
    dl.add_argument("-o", "--output", help="file to write (default: the backup's name)")
    d = cmd("delete", "delete a backup everywhere it is stored")
    d.add_argument("target")
    d.add_argument("backup")
    d.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")
    j = cmd("jobs", "jobs, newest first")
    j.add_argument("--target")
    j.add_argument("--status")
    j.add_argument("--kind")
    one = cmd("job", "one job")
    one.add_argument("job_id")
    one.add_argument("--follow", action="store_true", help="show live progress")
    cmd("follow", "follow a job's progress until it ends").add_argument("job_id")
    cmd("cancel", "cancel a job").add_argument("job_id")
    v = cmd("verify", "restore drill of the newest (or --backup) backup")
    v.add_argument("target")
    v.add_argument("--backup")
    v.add_argument("--identity-file", metavar="KEY",
                   help="age identity that decrypts an encrypted backup (when the worker "
                        "has no encryption.identity_file)")
    a = cmd("audit", "the audit trail (admin)")
    a.add_argument("--target")
    a.add_argument("--subject")
    a.add_argument("--limit", type=int, default=50)
    pr = cmd("prune", "apply the target's retention policy now (admin); --dry-run shows "
                      "what it would delete and why")
    pr.add_argument("target")
    pr.add_argument("--dry-run", action="store_true", help="plan only: delete nothing")
    pr.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")
    pt = cmd("pitr", "point-in-time recovery (PostgreSQL, MySQL/MariaDB): `status TARGET` "
                     "shows the window, "
                     "`restore TARGET --to T` restores to an instant of it, `drill TARGET "
                     "[--to T]` recovers an instant (default: a random one) in scratch and "
                     "checks it; `restore-cluster TARGET --to T --data-dir D` (on the new "
                     "server, with the config: reads the archive from storage directly) "
                     "writes a data directory that starts as the server was at T")
    pt.add_argument("action", choices=("status", "restore", "drill", "restore-cluster"))
    pt.add_argument("target")
    pt.add_argument("--to", metavar="T", help="an RFC 3339 instant with its zone "
                                              "(2026-12-07T10:14:59Z), \"latest\", "
                                              "(drill) \"random\", or (MySQL) a binlog "
                                              "position binlog.000042:1234 (up to the "
                                              "event there, not including it) or a "
                                              "MariaDB GTID gtid:0-1-42 (through that "
                                              "transaction)")
    pt.add_argument("--data-dir", metavar="D", help="restore-cluster: a new or empty "
                                                   "directory")
    pt.add_argument("--pg-bindir", metavar="DIR", help="restore-cluster: PostgreSQL's tools "
                    "(default: the base's major version, Debian's layout or pg_config)")
    pt.add_argument("--owner", help="restore-cluster: the user owning D (default as root: "
                                    "postgres)")
    pt.add_argument("--no-safety-backup", action="store_true")
    pt.add_argument("--terminate-connections", action="store_true")
    _scope_options(pt)
    pt.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")
    cmd("schedules", "each target's schedule: next run, last scheduled job and its outcome")
    cmd("destinations", "where backups are stored: reachable, writable, free space (admin)")
    for p in (b, r, up, v, pt):
        p.add_argument("--follow", action="store_true", help="show live progress")
        p.add_argument("--wait", action="store_true",
                       help="wait for the job to end (no progress shown)")


def _scope_options(p: argparse.ArgumentParser) -> None:
    """Where a restore goes and what of it (a backup's, or a point in time's)."""
    p.add_argument("--into-database", metavar="NAME",
                   help="restore into this new database beside the live one, which is not "
                        "touched (PostgreSQL, MySQL; SQLite: a file name next to the "
                        "target's)")
    p.add_argument("--into-target", metavar="TARGET",
                   help="restore into this other target of the same engine (its "
                        "credentials, lock and safety backup), e.g. prod -> staging")
    p.add_argument("--table", action="append", metavar="TABLE", dest="tables",
                   help="only this table (repeat; PostgreSQL schema.table, MySQL, SQLite: "
                        "table): every other table is left exactly as it is")
    p.add_argument("--replace", action="store_true",
                   help="with --into-database: restore over it when it exists")


def confirm(args: argparse.Namespace, question: str) -> bool:
    """Yes on --yes; on a terminal, ask; otherwise refuse (the caller exits 2)."""
    if getattr(args, "yes", False):
        return True
    if not sys.stdin.isatty():
        print(f"safehold: {question} — refusing without a terminal; pass --yes",
              file=sys.stderr)
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer in ("y", "yes"):
        return True
    print("safehold: not confirmed; nothing was done", file=sys.stderr)
    return False


def _rows(table: ApiDoc) -> str:
    """A table's rows: exact where the engine counts them (SQLite), `~n` for an estimate
    (PostgreSQL, MySQL), `?` for a table never analysed."""
    if "rows_estimate" in table:
        n = table["rows_estimate"]
        return "?" if n is None else f"~{n}"
    return str(table.get("rows", ""))


def _drill(verification: object) -> str:
    """The last drill in a word: passed, failed, or `not run: <why>` (no key, no rights:
    nothing learnt about the backup)."""
    if not isinstance(verification, dict):
        return ""
    if verification.get("outcome") == "not_run":
        return f"not run: {verification.get('error')}"
    return str(verification.get("outcome") or "")


def _warn(job: object) -> None:
    for warning in (job.get("warnings") or []) if isinstance(job, dict) else []:
        print(f"warning: {warning}", file=sys.stderr)


def _table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


async def follow(client: Client, job: ApiDoc, as_json: bool) -> int:
    tty = sys.stderr.isatty()
    async for ev in client.events(job["id"]):
        t = ev.get("type")
        if t == "progress":
            line = render_progress(ev.get("progress", {}))
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
                  flush=True)
        elif t in ("phase", "log", "started", JobStatus.RUNNING, JobStatus.QUEUED):
            msg = ev.get("message") or ev.get("phase") or t
            print(("\r\033[K" if tty else "") + f"· {msg}", file=sys.stderr)
    final = await client.call("GET", f"/api/v1/jobs/{job['id']}")
    if tty:
        if final.get("status") == JobStatus.SUCCEEDED:  # even a job too quick for a progress event
            done = {**(final.get("progress") or {}), "percent": 100.0, "phase": "done",
                    "eta_s": None}
            print("\r\033[K" + render_progress(done), end="", file=sys.stderr)
        print(file=sys.stderr)
    return finish(final, as_json)


def finish(job: ApiDoc, as_json: bool) -> int:
    print(json.dumps(job, indent=2) if as_json else final_line(job))
    return EXIT_OK if job.get("status") == JobStatus.SUCCEEDED else EXIT_FAILED


async def job_started(client: Client, job: ApiDoc, args: argparse.Namespace) -> int:
    """After a submit: follow it, wait for it, or show it."""
    _warn(job)
    if getattr(args, "follow", False):
        return await follow(client, job, args.json)
    if getattr(args, "wait", False) and job.get("status") not in TERMINAL:
        job = await client.call("GET", f"/api/v1/jobs/{job['id']}?wait={JOB_WAIT}")
        while job.get("status") not in TERMINAL:
            async for _ in client.events(job["id"]):
                pass
            job = await client.call("GET", f"/api/v1/jobs/{job['id']}")
    if job.get("status") in TERMINAL:
        return finish(job, args.json)
    print(json.dumps(job, indent=2) if args.json else
          f"{job['kind']} job {job['id']} {job['status']} (safehold follow {job['id']})")
    return EXIT_OK


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


async def _show(client: Client, args: argparse.Namespace, path: str,
                render: Callable[[ApiDoc], None]) -> ApiDoc:
    """GET `path`: the JSON as it came with --json, else `render(doc)` (tables)."""
    doc = await client.call("GET", path)
    if args.json:
        _print_json(doc)
    else:
        render(doc)
    return doc


async def _cmd_targets(client: Client, args: argparse.Namespace) -> int:
    def render(doc: ApiDoc) -> None:
        print(_table([[t["id"], t["engine"], t.get("schedule") or "-",
                       "default" if t["id"] == doc.get("default_target") else ""]
                      for t in doc["targets"]], ["TARGET", "ENGINE", "SCHEDULE", ""]))

    await _show(client, args, "/api/v1/targets", render)
    return EXIT_OK


async def _cmd_stats(client: Client, args: argparse.Namespace) -> int:
    def render(doc: ApiDoc) -> None:
        print(f"{doc.get('engine')} {doc.get('server_version', '')}: "
              f"{mib(doc.get('size_bytes'))}, {doc.get('table_count', '?')} tables")
        rows = [[t["name"], _rows(t), mib(t.get("size_bytes"))]
                for t in doc.get("tables", [])]
        if rows:
            print(_table(rows, ["TABLE", "ROWS", "SIZE"]))
        databases = [[d.get("database"), d.get("table_count"), mib(d.get("size_bytes"))]
                     for d in doc.get("databases") or [] if isinstance(d, dict)]
        if databases:  # a server target: what its next set holds
            print(_table(databases, ["DATABASE", "TABLES", "SIZE"]))

    await _show(client, args, f"/api/v1/targets/{args.target}/stats", render)
    return EXIT_OK


async def _cmd_backups(client: Client, args: argparse.Namespace) -> int:
    def render(doc: ApiDoc) -> None:
        print(_table([[b["filename"], b.get("kind"), mib(b.get("size_bytes")),
                       b.get("created_at"), ",".join(b.get("stored_on") or []),
                       _drill(b.get("verification"))]
                      for b in doc["backups"]],
                     ["BACKUP", "KIND", "SIZE", "CREATED", "STORED ON", "DRILL"]))

    await _show(client, args, f"/api/v1/targets/{args.target}/backups", render)
    return EXIT_OK


def _safe(value: object) -> str:
    """A value from a backup, made harmless for a terminal (no control characters)."""
    text = "NULL" if value is None else str(value)
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


async def _cmd_contents(client: Client, args: argparse.Namespace) -> int:
    if args.table:
        query = urlencode({"limit": args.limit, **({"where": args.where} if args.where
                                                    else {})})

        def rows(doc: ApiDoc) -> None:
            print(_table([[_safe(v) for v in r] for r in doc.get("rows") or []],
                         [_safe(c) for c in doc.get("columns") or []]))
            print(f"({len(doc.get('rows') or [])} rows; "
                  + ("the whole table read" if doc.get("complete") else "stopped at --limit")
                  + ("" if doc.get("checksum_verified") else
                     "; the backup was not read to its end, so its checksum was not "
                     "checked") + ")")
        await _show(client, args, f"/api/v1/targets/{args.target}/backups/"
                                  f"{quote(args.backup, safe='')}/contents/"
                                  f"{quote(args.table, safe='')}?{query}", rows)
        return EXIT_OK

    def table(part: ApiDoc) -> str:
        unit = part.get("unit") or "count"
        rows = [[i["name"], "?" if i.get("count") is None else
                 (str(i["count"]) if part.get("exact") else f"~{i['count']}"),
                 mib(i["bytes"]) if isinstance(i.get("bytes"), int) else "-"]
                for i in part.get("items") or []]
        return _table(rows, ["NAME", unit.upper(), "DATA"]) if rows else "(nothing recorded)"

    def render(doc: ApiDoc) -> None:
        for member in doc.get("databases") or []:
            print(f"database {member.get('database')}")
            print(table(member))
        if "databases" not in doc:
            print(table(doc))

    await _show(client, args, f"/api/v1/targets/{args.target}/backups/"
                              f"{quote(args.backup, safe='')}/contents", render)
    return EXIT_OK


async def _cmd_backup(client: Client, args: argparse.Namespace) -> int:
    body = {"compress": not args.no_compress, "note": args.note or ""}
    job = await client.call("POST", f"/api/v1/targets/{args.target}/backups", json=body)
    return await job_started(client, job, args)


async def _cmd_restore(client: Client, args: argparse.Namespace) -> int:
    question = (f"Restore {args.backup} into database {args.into_database} beside target "
                f"'{args.target}''s (which is not touched)"
                + (", replacing it if it exists?" if args.replace else "?")
                if args.into_database else
                f"Replace the database of target '{args.target}' with {args.backup}?")
    if args.into_target:
        question = (f"Replace the database of target '{args.into_target}' with "
                    f"{args.backup}, a backup of target '{args.target}'?")
    if args.tables or args.schemas:
        some = " and ".join(([f"table(s) {', '.join(args.tables)}"] if args.tables else [])
                            + ([f"the tables of schema(s) {', '.join(args.schemas)}"]
                               if args.schemas else []))
        question = question.replace("the database of", f"{some} of the database of").replace(
            f"Restore {args.backup}", f"Restore {some} of {args.backup}")
    if not confirm(args, question):
        return EXIT_USAGE
    req: ApiDoc = {"backup": args.backup,
                   "create_safety_backup": not args.no_safety_backup}
    if args.into_database:
        req["into_database"] = args.into_database
    if args.replace:
        req["replace"] = True
    if args.tables:
        req["tables"] = args.tables
    if args.schemas:
        req["schemas"] = args.schemas
    if args.into_target:
        req["into_target"] = args.into_target
    if args.keys:
        req["keys"] = args.keys
    if args.terminate_connections:
        req["terminate_connections"] = True
    if args.roles:
        req["roles"] = args.roles
    if args.database:
        req["database"] = args.database
    if args.owner_map:
        pairs = [m.split("=", 1) for m in args.owner_map]
        if any(len(p) != 2 or not all(p) for p in pairs):
            print("--owner-map takes OLD=NEW", file=sys.stderr)
            return EXIT_USAGE
        req["owner_map"] = dict(pairs)
    if args.identity_file:  # sent once, sealed by the API for the workers
        req["identity"] = await asyncio.to_thread(Path(args.identity_file).read_text)
    job = await client.call("POST", f"/api/v1/targets/{args.target}/restores", json=req)
    return await job_started(client, job, args)


def _drill_text(drill: object) -> str:
    """A base's last PITR drill, in a few words."""
    if not isinstance(drill, dict):
        return "-"
    rto = drill.get("rto_s")
    return (f"{drill.get('outcome')} to {drill.get('point_in_time')}"
            + (f", RTO {rto} s" if isinstance(rto, (int, float)) else ""))


async def _cmd_pitr(client: Client, args: argparse.Namespace) -> int:
    if args.action == "status":
        def render(doc: ApiDoc) -> None:
            s = doc.get("streaming") or {}
            print(f"window   {doc.get('earliest') or '(no base yet)'} .. "
                  f"{doc.get('latest') or '(nothing archived)'}"
                  + (f"  ({doc['lag_s']:.1f} s behind)" if doc.get("lag_s") is not None
                     else ""))
            if doc.get("engine") == "mysql":  # binlog positions: file number:offset
                print(f"streamer {s.get('streamer') or '-'}  shipped {s.get('shipped') or '-'}"
                      f"  server {s.get('server') or '-'}")
            else:
                print(f"streamer {s.get('streamer') or '-'}  slot {s.get('slot')} holds "
                      f"{mib(s.get('slot_bytes'))}")
            if s.get("error"):
                print(f"error    {s['error']} ({s.get('error_at')})")
            if isinstance(doc.get("gtid"), dict):
                print(f"gtid     {doc['gtid'].get('from')} .. {doc['gtid'].get('to')}")
            for g in doc.get("gaps") or []:
                if g.get("continuous"):
                    print(f"gtid     at {g.get('from')}: {g.get('why')}")
                    continue
                print(f"gap      after {g.get('after')}: {g.get('from_lsn', g.get('from'))}.."
                      f"{g.get('to_lsn', g.get('to'))} ({g.get('why')})")
            rows = [[b["filename"], b["consistent_at"], mib(b.get("size_bytes")),
                     "yes" if b.get("usable") else "no", _drill_text(b.get("last_drill"))]
                    for b in doc.get("bases") or []]
            if rows:
                print(_table(rows, ["BASE", "CONSISTENT AT", "SIZE", "USABLE",
                                    "LAST DRILL"]))

        await _show(client, args, f"/api/v1/targets/{args.target}/recovery-window", render)
        return EXIT_OK
    if args.action == "drill":
        job = await client.call("POST", f"/api/v1/targets/{args.target}/verify",
                                json={"point_in_time": args.to or "random"})
        return await job_started(client, job, args)
    if not args.to:
        print("safehold: pitr restore needs --to T (an instant, or latest)", file=sys.stderr)
        return EXIT_USAGE
    some = f"table(s) {', '.join(args.tables)} of " if args.tables else ""
    question = (f"Restore {some}target '{args.target}' as it was at {args.to} into "
                f"database {args.into_database} beside it (which is not touched)"
                + (", replacing it if it exists?" if args.replace else "?")
                if args.into_database else
                f"Replace {some}the database of target '{args.into_target}' with target "
                f"'{args.target}' as it was at {args.to}?" if args.into_target else
                f"Replace {some}the database of target '{args.target}' with its state "
                f"at {args.to}?")
    if not confirm(args, question):
        return EXIT_USAGE
    req: ApiDoc = {"point_in_time": args.to,
                   "create_safety_backup": not args.no_safety_backup}
    if args.terminate_connections:
        req["terminate_connections"] = True
    for key in ("into_database", "into_target", "tables"):
        if getattr(args, key):
            req[key] = getattr(args, key)
    if args.replace:
        req["replace"] = True
    job = await client.call("POST", f"/api/v1/targets/{args.target}/restores", json=req)
    return await job_started(client, job, args)


async def _cmd_upload(client: Client, args: argparse.Namespace) -> int:
    if args.restore and not confirm(args, f"Upload {args.file} and replace the database "
                                          f"of target '{args.target}' with it?"):
        return EXIT_USAGE
    path = Path(args.file)
    if not await asyncio.to_thread(path.is_file):
        print(f"safehold: no such file: {path}", file=sys.stderr)
        return EXIT_USAGE
    doc = await client.upload(f"/api/v1/targets/{args.target}/uploads", args.target, path,
                              restore=args.restore, safety=not args.no_safety_backup)
    if args.restore:
        return await job_started(client, doc["job"], args)
    if args.json:
        _print_json(doc)
    else:
        print(f"✓ uploaded {doc['filename']} {mib(doc.get('size_bytes'))} "
              f"(sha256 {str(doc.get('sha256'))[:16]}…)")
    return EXIT_OK


async def _cmd_download(client: Client, args: argparse.Namespace) -> int:
    target = Path(args.output or Path(args.backup).name)
    if not target.parent.is_dir():
        print(f"safehold: cannot write {target}: the directory {target.parent} does not "
              "exist (create it first)", file=sys.stderr)
        return EXIT_USAGE
    doc = await client.download(args.target, args.backup, target)
    if args.json:
        _print_json(doc)
    else:
        print(f"✓ {doc['file']} {mib(doc['size_bytes'])} (sha256 verified)")
    return EXIT_OK


async def _cmd_delete(client: Client, args: argparse.Namespace) -> int:
    if not confirm(args, f"Delete {args.backup} of target '{args.target}' everywhere it "
                         "is stored?"):
        return EXIT_USAGE
    doc = await client.call("DELETE", f"/api/v1/targets/{args.target}/backups/"
                                      f"{args.backup}")
    if args.json:
        _print_json(doc)
    else:
        print(f"✓ deleted {doc['deleted']}")
    return EXIT_OK


async def _cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    query = "&".join(f"{k}={getattr(args, k)}" for k in ("target", "status", "kind")
                     if getattr(args, k))
    doc = await client.call("GET", "/api/v1/jobs" + (f"?{query}" if query else ""))
    if args.json:
        _print_json(doc)
    else:
        print(_table([[j["id"], j["kind"], j["target"], j["status"], j.get("created_at"),
                       (j.get("error") or {}).get("code", "")] for j in doc["jobs"]],
                     ["JOB", "KIND", "TARGET", "STATUS", "CREATED", "ERROR"]))
    return EXIT_OK


async def _cmd_job(client: Client, args: argparse.Namespace) -> int:
    job = await client.call("GET", f"/api/v1/jobs/{args.job_id}")
    if args.command == "follow" or args.follow:
        return await follow(client, job, args.json)
    if args.json or job.get("status") not in TERMINAL:
        _print_json(job)
        return EXIT_OK
    return finish(job, False)


async def _cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = await client.call("DELETE", f"/api/v1/jobs/{args.job_id}")
    if args.json:
        _print_json(job)
    else:
        print(f"{job['kind']} job {job['id']}: {job['status']}"
              + (" (cancel requested)" if job.get("status") not in
                 TERMINAL else ""))
    return EXIT_OK


async def _cmd_verify(client: Client, args: argparse.Namespace) -> int:
    drill: ApiDoc = {"backup": args.backup} if args.backup else {}
    if args.identity_file:  # sent once, sealed by the API for the workers
        drill["identity"] = await asyncio.to_thread(Path(args.identity_file).read_text)
    job = await client.call("POST", f"/api/v1/targets/{args.target}/verify", json=drill)
    return await job_started(client, job, args)


async def _cmd_audit(client: Client, args: argparse.Namespace) -> int:
    query = "&".join([f"limit={args.limit}"] + [
        f"{k}={getattr(args, k)}" for k in ("target", "subject") if getattr(args, k)])
    doc = await client.call("GET", f"/api/v1/audit?{query}")
    if args.json:
        _print_json(doc)
    else:
        print(_table([[e.get("ts"), e.get("subject"), e.get("via") or e.get("client"),
                       e.get("action"),
                       e.get("result"), e.get("target"), e.get("backup") or e.get("job")]
                      for e in doc["entries"]],
                     ["TIME", "WHO", "VIA", "ACTION", "RESULT", "TARGET", "WHAT"]))
    return EXIT_OK


async def _cmd_prune(client: Client, args: argparse.Namespace) -> int:
    return await _prune(client, args)


async def _cmd_schedules(client: Client, args: argparse.Namespace) -> int:
    def render(doc: ApiDoc) -> None:
        print(_table([[e["target"], e.get("schedule") or "-", e.get("next_run") or "-",
                       e.get("last_job") or "-",
                       (e.get("last_status") or "-") + (f" ({e['last_error']})"
                                                        if e.get("last_error") else ""),
                       f"missed since {e['missed_since']}" if e.get("missed_since")
                       else "", _policy(e.get("retention"))]
                      for e in doc["schedules"]],
                     ["TARGET", "SCHEDULE", "NEXT RUN", "LAST JOB", "LAST STATUS", "ALERT",
                      "RETENTION"]))

    await _show(client, args, "/api/v1/schedules", render)
    return EXIT_OK


async def _cmd_destinations(client: Client, args: argparse.Namespace) -> int:
    def render(doc: ApiDoc) -> None:
        print(_table([[d.get("name"), d.get("type"), d.get("bucket") or d.get("path"),
                       "yes" if d.get("reachable") else f"NO ({d.get('error')})",
                       {True: "yes", False: "NO", None: "?"}[d.get("writable")],
                       mib(d.get("free_bytes")), d.get("backups"), mib(d.get("bytes")),
                       ",".join(d.get("targets") or [])]
                      for d in doc["destinations"]],
                     ["DESTINATION", "TYPE", "WHERE", "REACHABLE", "WRITABLE", "FREE",
                      "BACKUPS", "SIZE", "TARGETS"]))

    doc = await _show(client, args, "/api/v1/destinations", render)
    ok = all(d.get("reachable") and d.get("writable") is not False
             for d in doc["destinations"])
    return EXIT_OK if ok else EXIT_FAILED


Command = Callable[[Client, argparse.Namespace], Awaitable[int]]
COMMANDS: dict[str, Command] = {
    "targets": _cmd_targets,
    "stats": _cmd_stats,
    "backups": _cmd_backups,
    "contents": _cmd_contents,
    "backup": _cmd_backup,
    "restore": _cmd_restore,
    "upload": _cmd_upload,
    "download": _cmd_download,
    "delete": _cmd_delete,
    "jobs": _cmd_jobs,
    "job": _cmd_job,
    "follow": _cmd_job,
    "cancel": _cmd_cancel,
    "verify": _cmd_verify,
    "audit": _cmd_audit,
    "prune": _cmd_prune,
    "pitr": _cmd_pitr,
    "schedules": _cmd_schedules,
    "destinations": _cmd_destinations,
}


async def run(client: Client, args: argparse.Namespace) -> int:
    command = COMMANDS.get(args.command)
    if command is None:
        print(f"safehold: unknown command {args.command}", file=sys.stderr)
        return EXIT_USAGE
    return await command(client, args)


def _policy(policy: object) -> str:
    if not isinstance(policy, dict) or not policy:
        return "keep everything"
    return ", ".join(f"{k}={v}" for k, v in policy.items())


async def _prune(client: Client, args: argparse.Namespace) -> int:
    """A dry run prints the plan (what goes, what stays and why); a real prune asks
    first, then says what it deleted where."""
    if not args.dry_run and not confirm(args, f"Delete the backups of target "
                                              f"'{args.target}' its retention policy no "
                                              "longer keeps?"):
        return EXIT_USAGE
    query = "dry_run=true" if args.dry_run else f"wait={JOB_WAIT}"
    job = await client.call("POST", f"/api/v1/targets/{args.target}/prune?{query}")
    if job.get("status") not in TERMINAL:
        job = await client.call("GET", f"/api/v1/jobs/{job['id']}?wait={JOB_WAIT}")
    if args.json or job.get("status") != JobStatus.SUCCEEDED:
        return finish(job, args.json)
    result = job.get("result") or {}
    rows = []
    for dest, d in (result.get("destinations") or {}).items():
        for p in d.get("plan") or []:
            if p.get("action") == "delete" or args.dry_run:
                rows.append([dest, p.get("filename"), p.get("action"),
                             "; ".join(p.get("reasons") or [])])
    if rows:
        print(_table(rows, ["DESTINATION", "BACKUP", "ACTION", "WHY"]))
    deleted = sum(len(d.get("deleted") or []) for d in (result.get("destinations") or
                                                       {}).values())
    verb = "would delete" if args.dry_run else "deleted"
    print(f"✓ prune {args.target}: {verb} {deleted} backup(s) "
          f"(policy: {_policy(result.get('policy'))})")
    return EXIT_OK
