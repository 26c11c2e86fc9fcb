"""The `token-vault-mcp` command (also `python -m server`). Exit 0 ok, 1 "no", 2 usage or configuration."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from server import audit, market, overview, policy
from server.clock import SystemClock, parse_rfc3339, rfc3339
from server.config import Config, configure_logging, is_loopback_host, load_config
from server.errors import BrokerError, ConfigError
from server.ledger import MAX_CREDIT
from server.store import AuditFilter, Database, DatabaseMissing, StoreUnavailable, Tx, open_database
from server.textsafe import escape_controls

if TYPE_CHECKING:
    from server.broker import Broker
    from server.models import Move

OK, NO, USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):  # no command, or a group (audit, wallet, market) without one
        (getattr(args, "group", None) or parser).print_help(sys.stderr)
        return USAGE
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"token-vault-mcp: configuration error: {exc}", file=sys.stderr)
        return USAGE
    configure_logging(config.log_level)
    try:
        return int(args.handler(config, args))
    except ConfigError as exc:
        print(f"token-vault-mcp: configuration error: {exc}", file=sys.stderr)
        return USAGE
    except (market.MarketFileError, policy.PolicyFileError) as exc:
        print(f"token-vault-mcp: {escape_controls(str(exc))}", file=sys.stderr)
        return USAGE
    except BrokerError as exc:
        print(f"token-vault-mcp: {exc.render()}", file=sys.stderr)
        return NO
    except StoreUnavailable as exc:  # e.g. PostgreSQL down or unreachable
        print(f"token-vault-mcp: the database is unavailable: {escape_controls(str(exc))}", file=sys.stderr)
        return NO
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="token-vault-mcp", description=__doc__)
    sub = p.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the MCP server")
    serve.add_argument("--transport", choices=("stdio", "sse", "http"), default="stdio")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=_serve)

    emu = sub.add_parser("emulator", help="run the Auth0 emulator on loopback (prints demo credentials)")
    emu.add_argument("--port", type=int, default=8123)
    emu.add_argument("--host", default="127.0.0.1")
    _emulator_flags(emu)
    emu.set_defaults(handler=_emulator)

    log_in = sub.add_parser("login", help="sign in with Auth0 (device flow) for stdio mode; --status shows who")
    log_in.add_argument("--status", action="store_true", help="say who is logged in (exit 1 if nobody)")
    log_in.set_defaults(handler=_login)
    log_out = sub.add_parser("logout", help="revoke and remove the login stored by `login`")
    log_out.set_defaults(handler=_logout)
    conn = sub.add_parser("connect", help="connect an account (e.g. github) to your Auth0 user for Token Vault")
    conn.add_argument("connection", help="the Auth0 connection, e.g. github or google-oauth2")
    conn.add_argument("--scopes", nargs="*", default=[], metavar="S", help="provider scopes to ask for")
    conn.set_defaults(handler=_connect)

    aud = _group(sub, "audit", "read and check the audit log")
    lst = aud.add_parser("list", help="who got what, when, and why")
    _audit_filters(lst)
    lst.add_argument("--limit", type=int, default=50, help="newest N events (default 50; 0 = all)")
    lst.add_argument("--json", action="store_true", help="JSON Lines for scripts")
    lst.set_defaults(handler=_audit_list)
    ver = aud.add_parser("verify", help="check the hash chain (exit 1 names the first bad event)")
    ver.add_argument("--ledger", action="store_true", help="also check the ledger invariants")
    ver.set_defaults(handler=_audit_verify)
    exp = aud.add_parser("export", help="all events as JSON Lines on stdout")
    _audit_filters(exp)
    exp.set_defaults(handler=_audit_export)
    look = aud.add_parser("lookup", help="events of a token (read from stdin, never from arguments)")
    look.add_argument("--token-stdin", action="store_true", required=True)
    look.add_argument("--json", action="store_true")
    look.set_defaults(handler=_audit_lookup)

    wal = _group(sub, "wallet", "fund and inspect wallets")
    cred = wal.add_parser("credit", help="add credits to an account's wallet (from mint, audited)")
    cred.add_argument("account")
    cred.add_argument("amount", type=_positive_int)
    cred.set_defaults(handler=_wallet_credit)
    tr = wal.add_parser("transfer", help="move credits from one wallet to another (double-entry, audited on both)")
    tr.add_argument("from_account", metavar="FROM")
    tr.add_argument("to_account", metavar="TO")
    tr.add_argument("amount", metavar="AMOUNT", type=_positive_int)
    _idempotency_flag(tr)
    tr.set_defaults(handler=_wallet_transfer)
    show = wal.add_parser("show", help="balance and holdings of an account")
    show.add_argument("account")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_wallet_show)

    quo = _group(sub, "quota", "quota units held by accounts")
    qt = quo.add_parser("transfer", help="move held units of a listing from one account to another (audited on both)")
    qt.add_argument("from_account", metavar="FROM")
    qt.add_argument("to_account", metavar="TO")
    qt.add_argument("listing", metavar="LISTING")
    qt.add_argument("units", metavar="UNITS", type=partial(_positive_int, what="units"))
    _idempotency_flag(qt)
    qt.set_defaults(handler=_quota_transfer)

    mkt = _group(sub, "market", "listings")
    ml = mkt.add_parser("list", help="all listings with today's price")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(handler=_market_list)
    mload = mkt.add_parser("load", help="upsert listings from a TOML file")
    mload.add_argument("file")
    mload.set_defaults(handler=_market_load)

    agents = _group(sub, "agent", "see and stop agents (the kill switch)")
    al = agents.add_parser("list", help="every agent seen: accounts, calls, last call, blocked and why")
    al.add_argument("--json", action="store_true")
    al.set_defaults(handler=_agent_list)
    ab = agents.add_parser("block", help="refuse every call of AGENT on every server sharing the database")
    ab.add_argument("agent", metavar="AGENT", help="the agent's id (its tokens' azp / client_id)")
    ab.add_argument("--reason", default="blocked by the operator", help="told to the agent with every refusal")
    ab.set_defaults(handler=_agent_block)
    au = agents.add_parser("unblock", help="let AGENT call again")
    au.add_argument("agent", metavar="AGENT")
    au.set_defaults(handler=_agent_unblock)

    pol = _group(sub, "policy", "the per-agent policy (connections, rates, caps, approval)")
    pl = pol.add_parser("load", help="replace the policy with a TOML file")
    pl.add_argument("file")
    pl.set_defaults(handler=_policy_load)
    ps = pol.add_parser("show", help="the policy in force")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(handler=_policy_show)

    con = sub.add_parser("console", help="the operator console in a browser, on loopback (prints a one-time link)")
    con.add_argument("--port", type=int, default=8400)
    con.add_argument("--host", default="127.0.0.1", help="a loopback address (the console never listens beyond)")
    con.set_defaults(handler=_console)

    dbs = _group(sub, "db", "the database itself")
    dm = dbs.add_parser("migrate", help="copy the SQLite database of TVM_DATABASE into an empty PostgreSQL database")
    dm.add_argument("--to", required=True, metavar="postgresql://USER@HOST:PORT/DB", help="the empty target")
    dm.set_defaults(handler=_db_migrate)
    return p


def _group(sub: Any, name: str, text: str) -> Any:
    """A command with subcommands; given alone, it prints its own help."""
    group = sub.add_parser(name, help=text, description=text)
    group.set_defaults(group=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def _audit_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account")
    p.add_argument("--agent")
    p.add_argument("--tool")
    p.add_argument("--outcome", choices=("ok", "denied", "error"))
    p.add_argument("--since", type=_time, help="RFC 3339 time, e.g. 2026-11-01T00:00:00Z")
    p.add_argument("--until", type=_time)


def _idempotency_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="retry safely: the same key and arguments answer the first move and move nothing again")


def _positive_int(text: str, what: str = "credits") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    if value > MAX_CREDIT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_CREDIT:,} {what} at a time")
    return value


def _time(text: str) -> str:
    try:
        return rfc3339(parse_rfc3339(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None


# ---- helpers -----------------------------------------------------------------------------

def _with_db(config: Config, work: Callable[[Database], Awaitable[int]], *, create: bool = False) -> int:
    """Run `work` on the configured database; only commands that record something may create it.

    Reading a mistyped TVM_DATABASE must not answer "chain OK: 0 events" from a fresh, empty file (or a
    PostgreSQL database without the schema). Raises ConfigError when the database is missing and `create`
    is false.
    """

    async def run() -> int:
        try:
            db = await open_database(config.database_url or config.database, create=create)
        except DatabaseMissing as exc:
            raise ConfigError(f"TVM_DATABASE: {exc}") from None
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(run())


def _with_broker(config: Config, work: Callable[[Broker], Awaitable[int]], *, create: bool = False) -> int:
    """Run an operator action `work` on a broker of the configured database (one that never calls Auth0)."""

    async def with_broker(db: Database) -> int:
        from server.broker import Broker  # imported here: the other commands start faster without it

        return await work(Broker(db))

    return _with_db(config, with_broker, create=create)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[escape_controls("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _json_line(value: Any) -> str:
    # ensure_ascii: control characters and everything non-ASCII leave as \u escapes
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _filter(args: argparse.Namespace) -> AuditFilter:
    return AuditFilter(
        account=args.account, agent=args.agent, tool=args.tool, outcome=args.outcome,
        since=args.since, until=args.until,
    )


# ---- serve and emulator --------------------------------------------------------------------

def _serve(config: Config, args: argparse.Namespace) -> int:
    if args.transport == "stdio":
        from server.serve import serve_stdio

        asyncio.run(serve_stdio(config))
        return OK
    if not is_loopback_host(args.host) and config.demo:
        raise ConfigError("demo mode serves loopback only: set AUTH0_DOMAIN to listen on " + args.host)
    from server.serve import serve_remote  # type: ignore[attr-defined]

    asyncio.run(serve_remote(config, args.transport, args.host, args.port))
    return OK


def _console(config: Config, args: argparse.Namespace) -> int:
    if not is_loopback_host(args.host):
        raise ConfigError("the local console serves loopback only (--host 127.0.0.1); "
                          "remote operators use /console on `serve --transport http` with Auth0")
    from server.serve import serve_console

    asyncio.run(serve_console(config, args.host, args.port))
    return OK


def _emulator_flags(p: argparse.ArgumentParser) -> None:
    faults = p.add_argument_group("fault injection (rates are fractions of requests, 0 to 1)")
    faults.add_argument("--latency", type=float, metavar="SECONDS", help="delay every answer")
    faults.add_argument("--fail-rate", type=float, metavar="F", help="answer this fraction with a 5xx")
    faults.add_argument("--fail-status", type=int, metavar="STATUS", help="the 5xx to answer (default 503)")
    faults.add_argument("--rate-limit-rate", type=float, metavar="F", help="answer this fraction with 429")
    faults.add_argument("--retry-after", type=int, metavar="SECONDS", help="send Retry-After on a 429")
    faults.add_argument("--reset-in", type=int, metavar="SECONDS", help="x-ratelimit-reset on a 429 (default 1)")
    faults.add_argument("--reset-rate", type=float, metavar="F", help="drop the connection of this fraction")
    faults.add_argument("--hang-rate", type=float, metavar="F", help="never answer this fraction")
    faults.add_argument("--malformed-rate", type=float, metavar="F", help="answer this fraction with bad JSON")
    faults.add_argument("--seed", type=int, help="seed the fault draws (repeatable runs)")
    faults.add_argument("--revoke", action="append", default=[], metavar="CONNECTION",
                        help="the demo user's connected account at CONNECTION was revoked (repeatable)")
    p.add_argument("--auto-approve", action="store_true", help="approve device logins at once as the demo user")
    p.add_argument("--device-interval", type=int, metavar="SECONDS", help="device flow polling interval")
    p.add_argument("--ciba", choices=("approve", "deny", "manual"), default="approve",
                   help="how the demo user answers CIBA approval requests (manual: POST /emulator/approvals/ID)")
    p.add_argument("--auto-login", metavar="USER",
                   help="sign USER (a user id, e.g. auth0|demo-user) in at /authorize at once, with no sign-in page")


def _emulator(config: Config, args: argparse.Namespace) -> int:
    if not is_loopback_host(args.host):
        raise ConfigError("the emulator serves loopback only (--host 127.0.0.1)")
    from pydantic import ValidationError

    from server.emulator import FaultSettings, serve

    names = ("latency", "fail_rate", "fail_status", "rate_limit_rate", "retry_after", "reset_in", "reset_rate",
             "hang_rate", "malformed_rate", "seed")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        faults = FaultSettings(**given) if given else None
        serve(args.port, args.host, faults=faults, revoke=args.revoke, auto_approve=args.auto_approve,
              device_interval=args.device_interval, ciba=args.ciba, auto_login=args.auto_login)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
        )
        print(f"token-vault-mcp: emulator: {problems}", file=sys.stderr)
        return USAGE
    except ValueError as exc:
        print(f"token-vault-mcp: emulator: {exc}", file=sys.stderr)
        return USAGE
    return OK


# ---- login and logout -----------------------------------------------------------------------

def _login(config: Config, args: argparse.Namespace) -> int:
    from server.auth0 import login

    if args.status:
        logged_in, text = login.status(config)
        print(escape_controls(text))
        return OK if logged_in else NO
    try:
        stored = asyncio.run(login.login(config, out=sys.stderr))
    except login.LoginError as exc:
        print(f"token-vault-mcp: login failed: {exc}", file=sys.stderr)
        return NO
    print(f"logged in as {escape_controls(stored.account or '?')}; login stored in {config.credentials_file} "
          "(only you can read it)", file=sys.stderr)
    return OK


def _connect(config: Config, args: argparse.Namespace) -> int:
    from server.connect_cli import connect

    name = args.connection
    if not name or len(name) > 128 or not name.isascii() or any(not (c.isalnum() or c in "-_") for c in name):
        raise ConfigError("connect: CONNECTION must be an Auth0 connection name like github")
    return OK if asyncio.run(connect(config, args.connection, list(args.scopes), sys.stdout)) else NO


def _logout(config: Config, args: argparse.Namespace) -> int:
    from server.auth0 import login

    print(escape_controls(asyncio.run(login.logout(config))))
    return OK


# ---- audit -----------------------------------------------------------------------------------

def _audit_list(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        limit = args.limit if args.limit > 0 else None
        records = await db.read(lambda tx: tx.find_audit(_filter(args), limit=limit, newest_first=True))
        records.reverse()
        if args.json:
            for rec in records:
                sys.stdout.write(_json_line(audit.export_line(rec)) + "\n")
            return OK
        rows = []
        for rec in records:
            data = json.loads(rec.args)
            rows.append([
                rec.ts[:19] + "Z", rec.account or "-", rec.agent or "-", rec.tool or "(auth)", rec.outcome,
                rec.code or "", _summary(data),
            ])
        print(_table(["time", "account", "agent", "tool", "outcome", "code", "purpose / arguments"], rows))
        if not records:
            print("(no events match)", file=sys.stderr)
        return OK

    return _with_db(config, work)


_summary = overview.summary


def _audit_verify(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        show_progress = sys.stderr.isatty()

        def progress(n: int) -> None:
            if show_progress:
                print(f"\rverified {n} events…", end="", file=sys.stderr, flush=True)

        def check(tx: Tx) -> audit.VerifyResult:
            return audit.verify_log(tx, progress)

        result = await db.read(check)
        if show_progress:
            print(file=sys.stderr)
        if not result.ok:
            print(f"audit chain BROKEN at event {result.bad_id}: {result.reason}")
            return NO
        print(f"audit chain OK: {result.checked} events")
        if args.ledger:
            from server.invariants import check_invariants

            problems = await db.read(check_invariants)
            if problems:
                for problem in problems:
                    print(f"ledger invariant BROKEN: {problem}")
                return NO
            print("ledger invariants OK")
        return OK

    return _with_db(config, work)


def _audit_export(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        def dump(tx: Tx) -> None:
            where = _filter(args)
            for rec in tx.iter_audit():
                if _matches(rec, where):
                    sys.stdout.write(_json_line(audit.export_line(rec)) + "\n")

        await db.read(dump)
        sys.stdout.flush()
        return OK

    return _with_db(config, work)


def _matches(rec: Any, where: AuditFilter) -> bool:
    for name in ("account", "agent", "tool", "outcome"):
        wanted = getattr(where, name)
        if wanted is not None and getattr(rec, name) != wanted:
            return False
    if where.since is not None and rec.ts < where.since:
        return False
    return not (where.until is not None and rec.ts > where.until)


def _audit_lookup(config: Config, args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("token-vault-mcp: no token on stdin", file=sys.stderr)
        return USAGE

    async def work(db: Database) -> int:
        fingerprint = audit.token_fingerprint(db.hmac_key, token)
        records = await db.read(lambda tx: tx.find_audit(AuditFilter(token_id=fingerprint)))
        if args.json:
            for rec in records:
                sys.stdout.write(_json_line(audit.export_line(rec)) + "\n")
        elif records:
            rows = [[r.id, r.ts[:19] + "Z", r.account, r.agent, r.tool, r.outcome, _summary(json.loads(r.args))]
                    for r in records]
            print(f"token_id {fingerprint.hex()}")
            print(_table(["id", "time", "account", "agent", "tool", "outcome", "purpose / arguments"], rows))
        else:
            print(f"no events for token_id {fingerprint.hex()}")
        return OK if records else NO

    return _with_db(config, work)


# ---- wallet and market ------------------------------------------------------------------------

def _wallet_credit(config: Config, args: argparse.Namespace) -> int:
    async def work(broker: Broker) -> int:
        balance = await broker.credit(args.account, args.amount)
        print(f"credited {args.amount} to {escape_controls(args.account)}; balance {balance}")
        return OK

    return _with_broker(config, work, create=True)


def _wallet_transfer(config: Config, args: argparse.Namespace) -> int:
    source, target, key = _move_args(args)
    if source == target:
        return _same_account()

    async def work(broker: Broker) -> int:
        move = await broker.transfer_credits(operator_name(), source, target, args.amount, key)
        _say_moved(move, f"{move.amount} credits", "balance")
        return OK

    return _with_broker(config, work)


def _quota_transfer(config: Config, args: argparse.Namespace) -> int:
    source, target, key = _move_args(args)
    listing = _operator_text(args.listing, "LISTING")
    if source == target:
        return _same_account()

    async def work(broker: Broker) -> int:
        move = await broker.transfer_units(operator_name(), source, target, listing, args.units, key)
        _say_moved(move, f"{move.amount} units of {move.listing_id}", "units held")
        return OK

    return _with_broker(config, work)


def _move_args(args: argparse.Namespace) -> tuple[str, str, str | None]:
    key = None if args.idempotency_key is None else _operator_text(args.idempotency_key, "--idempotency-key", 128)
    return _operator_text(args.from_account, "FROM"), _operator_text(args.to_account, "TO"), key


def _same_account() -> int:
    print("token-vault-mcp: FROM and TO must be different accounts", file=sys.stderr)
    return USAGE


def _say_moved(move: Move, what: str, after: str) -> None:
    source, target = escape_controls(move.from_account), escape_controls(move.to_account)
    verb = "already moved (same idempotency key; nothing moved again)" if move.replayed else "moved"
    print(f"{verb} {escape_controls(what)} from {source} to {target}; {after} {source} {move.from_after}, "
          f"{target} {move.to_after} (move {move.move_id})")


def _wallet_show(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        def read(tx: Tx) -> tuple[int | None, list[Any]]:
            return tx.balance(args.account), tx.holdings_of(args.account)

        balance, holdings = await db.read(read)
        if balance is None:
            print(f"no wallet for account {escape_controls(args.account)}", file=sys.stderr)
            return NO
        if args.json:
            print(_json_line({
                "account": args.account, "balance": balance,
                "holdings": [{"listing_id": h.listing_id, "connection": h.connection, "scopes": list(h.scopes),
                              "units_remaining": h.units_held, "units_bought": h.units_bought,
                              "units_consumed": h.units_consumed, "units_reserved": h.units_reserved}
                             for h in holdings],
            }))
            return OK
        print(f"account {escape_controls(args.account)}: balance {balance} credits")
        print(_table(
            ["listing", "connection", "scopes", "remaining", "bought", "used", "reserved"],
            [[h.listing_id, h.connection, " ".join(h.scopes), h.units_held, h.units_bought, h.units_consumed,
              h.units_reserved] for h in holdings],
        ))
        return OK

    return _with_db(config, work)


def _market_list(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        now = SystemClock().now()
        priced = await db.read(lambda tx: overview.listings(tx, now))
        if args.json:
            for p in priced:
                print(_json_line(overview.listing_json(p, now)))
            return OK
        print(_table(
            ["id", "connection", "scopes", "price", "start", "floor", "remaining", "status", "closes", "delivery",
             "approval"],
            [[p.listing.id, p.listing.connection, " ".join(p.listing.scopes), p.unit_price, p.listing.start_price,
              p.listing.floor_price, p.listing.supply_remaining, overview.listing_status(p, now),
              rfc3339(p.listing.closes_at)[:19],
              p.listing.delivery, p.listing.approval]
             for p in priced],
        ))
        return OK

    return _with_db(config, work)


def _market_load(config: Config, args: argparse.Namespace) -> int:
    specs = market.read_market_file(args.file)

    async def work(db: Database) -> int:
        count = await db.write(lambda tx: market.load(tx, specs))
        print(f"loaded {count} listing(s) from {args.file}")
        return OK

    return _with_db(config, work, create=True)



# ---- agents and policy (§9) ----------------------------------------------------------------------

def operator_name() -> str:
    """Who runs this command, for the audit log's account of an operator action."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - no user name (a container without a passwd entry)
        return "cli:operator"


def _agent_list(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        rows = await db.read(overview.agents)
        if args.json:
            for row in rows:
                print(_json_line(row))
            return OK
        print(_table(["agent", "accounts", "calls", "last call", "blocked", "reason"],
                     [[r["agent"], ",".join(r["accounts"]), r["calls"], r["last_call"] or "",
                       "yes" if r["blocked"] else "", r["reason"] or ""] for r in rows]))
        return OK

    return _with_db(config, work)


def _agent_block(config: Config, args: argparse.Namespace) -> int:
    agent, reason = _operator_text(args.agent, "AGENT"), _operator_text(args.reason, "--reason", 500)

    async def work(broker: Broker) -> int:
        closed = await broker.block_agent(agent, reason, operator_name())
        print(f"blocked {escape_controls(agent)}; {closed} live grants closed")
        return OK

    return _with_broker(config, work, create=True)


def _agent_unblock(config: Config, args: argparse.Namespace) -> int:
    agent = _operator_text(args.agent, "AGENT")

    async def work(broker: Broker) -> int:
        if not await broker.unblock_agent(agent, operator_name()):
            print(f"token-vault-mcp: agent {escape_controls(agent)} is not blocked", file=sys.stderr)
            return NO
        print(f"unblocked {escape_controls(agent)}")
        return OK

    return _with_broker(config, work)


def _policy_load(config: Config, args: argparse.Namespace) -> int:
    loaded = policy.read_policy_file(args.file)

    async def work(broker: Broker) -> int:
        count = await broker.load_policy(loaded, operator_name())
        print(f"loaded {count} agent rules from {args.file}")
        return OK

    return _with_broker(config, work, create=True)


def _policy_show(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        stored = await db.read(lambda tx: tx.get_meta("policy"))
        text = stored.decode() if isinstance(stored, bytes) else stored
        current = policy.Policy.from_json(text) if text else policy.Policy()
        rules = [r.model_dump(mode="json", exclude_none=True) for r in current.agents]
        if args.json:
            print(_json_line({"agents": rules, "default": policy.DEFAULT_RULE.model_dump(mode="json",
                                                                                      exclude_none=True)}))
            return OK
        if not rules:
            print(f"no policy loaded: every agent gets the defaults (calls_per_minute "
                  f"{policy.DEFAULT_CALLS_PER_MINUTE}, every connection, no caps, approval as each listing says)")
            return OK
        print(_table(
            ["agent", "connections", "calls/min", "spend/day", "grants/hour", "approval"],
            [[r["id"], " ".join(r.get("connections", [])) or "all", r["calls_per_minute"],
              r.get("max_spend_per_day", ""), r.get("max_grants_per_hour", ""), r["approval"]] for r in rules],
        ))
        return OK

    return _with_db(config, work)


# ---- the database (§12) -------------------------------------------------------------------------

def _db_migrate(config: Config, args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from server.invariants import check_invariants
    from server.store import migrate
    from server.store.base import is_database_url, shown_url

    if not is_database_url(args.to) or not urlsplit(args.to).path.strip("/"):
        raise ConfigError(f"--to must name a PostgreSQL database, as in postgresql://user@host:5432/db, "
                          f"not {shown_url(args.to)!r}")
    if config.database_url is not None:
        raise ConfigError("TVM_DATABASE: db migrate copies a SQLite database, and TVM_DATABASE names PostgreSQL")
    show_progress = sys.stderr.isatty()

    def progress(table: str, rows: int) -> None:
        if show_progress:
            print(f"\rcopying {table}: {rows} rows…\x1b[K", end="", file=sys.stderr, flush=True)

    try:
        done = asyncio.run(migrate.migrate(config.database, args.to, check=check_invariants, progress=progress))
    except DatabaseMissing as exc:
        raise ConfigError(f"TVM_DATABASE: {exc}") from None
    except (migrate.MigrationRefused, migrate.MigrationFailed) as exc:
        print(f"token-vault-mcp: {escape_controls(str(exc))}", file=sys.stderr)
        return NO
    finally:
        if show_progress:
            print(file=sys.stderr)
    print(f"copied {escape_controls(str(config.database))} into {escape_controls(done.target)}")
    print(_table(["table", "rows"], [[table, rows] for table, rows in done.rows.items()]))
    print(f"audit: {done.events} events, head {done.head or '(none)'}; chain and ledger verified on the copy")
    return OK


def _operator_text(text: str, name: str, limit: int = 200) -> str:
    if not text.strip() or len(text) > limit or any(ch in text for ch in "\r\n\x00"):
        raise ConfigError(f"{name} must be 1 to {limit} characters on one line")
    return text
