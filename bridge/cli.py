"""The `order-bridge` command.

Every failure ends in one line on stderr and an exit code: 2 for a usage or config
problem, 1 for a runtime one (Kafka unreachable, a port taken, a provider refusing),
130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import NoReturn, TypeVar

import httpx
import orjson

from bridge import __version__, deadletters, logs, providers
from bridge.accounts import Account
from bridge.config import Config, load_config
from bridge.errors import BridgeError, ConfigError, OrderNotFound, ProviderError
from bridge.query import query_order

T = TypeVar("T")

# The order id `check-config --probe` asks for: "not found" means the credentials work.
PROBE_ORDER_ID = "order-bridge-probe"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_format or "text", verbose=args.verbose)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        logs.fatal(str(exc))
        return 2
    except BridgeError as exc:
        logs.fatal(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage error is one line (and exit code 2), not the usage text and a line."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="order-bridge",
        description="Providers' callbacks in, confirmed order-status events out.",
    )
    parser.add_argument("--version", action="version", version=f"order-bridge {__version__}")
    _add_log_options(parser, top=True)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, text: str, run: Callable[[argparse.Namespace], int]) -> _Parser:
        sub: _Parser = commands.add_parser(name, help=text, description=text)
        _add_log_options(sub, top=False)
        sub.set_defaults(run=run)
        return sub

    for name, receiver, worker, text in (
        ("serve", True, True, "run the receiver and the worker (the usual run)"),
        ("receiver", True, False, "run only the receiver: callbacks into the inbox"),
        ("worker", False, True, "run only the worker: inbox hints into status events"),
    ):
        serve = command(name, text, _serve)
        _add_config_option(serve)
        serve.set_defaults(receiver=receiver, worker=worker)
        if receiver and worker:
            serve.add_argument(
                "--one-process",
                action="store_true",
                help="the worker in this process too (the default with one CPU): "
                "otherwise it runs in a child process, on a core of its own",
            )
        if worker and not receiver:
            # Set by `serve` for its child: stop when the parent is gone.
            serve.add_argument("--with-parent", action="store_true", help=argparse.SUPPRESS)

    query = command("query", "one signed order-detail query; prints the snapshot", _query)
    query.add_argument("provider", choices=providers.names())
    query.add_argument("account")
    query.add_argument("order_id")
    _add_config_option(query)

    tail = command("tail", "follow the status topic, one line an event", _tail)
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest event")
    _add_config_option(tail)

    letters = command("deadletters", "list dead letters, newest first, or follow them", _letters)
    _add_filters(letters)
    letters.add_argument("--follow", action="store_true", help="print new ones as they come")
    letters.add_argument("--json", action="store_true", help="one JSON object a line")
    _add_config_option(letters)

    replay = command(
        "replay", "write dead letters back into the inbox, to be confirmed again", _replay
    )
    _add_filters(replay)
    replay.add_argument("--rate", type=_arg(_rate), metavar="N", help="at most N a second")
    replay.add_argument("--dry-run", action="store_true", help="count, write nothing")
    _add_config_option(replay)

    check = command("check-config", "validate a config; --probe queries each account", _check)
    check.add_argument(
        "--probe", action="store_true", help="send one signed query per account: ok or why not"
    )
    _add_config_option(check)

    broker = command("broker", "run the embedded Kafka-protocol broker alone", _broker)
    broker.add_argument("--port", type=int, default=9092, help="its port (default 9092; 0: free)")

    dev = command("dev", "everything on this machine, no setup: a demo", _dev)
    dev.add_argument("--once", action="store_true", help="exit when the demo story is done")
    dev.add_argument("--port", type=int, default=0, help="the bridge's HTTP port (default: free)")
    return parser


def _add_log_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and --log-format, taken before or after the command. On the command they
    default to nothing, so that they leave what was given before it alone."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log at INFO level",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=None if top else argparse.SUPPRESS,
        help="text (default) or json: one object a line; overrides [log] format",
    )


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="the TOML config (default: $ORDER_BRIDGE_CONFIG)"
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason",
        action="append",
        default=[],
        type=_arg(deadletters.parse_reason),
        help="only this reason (repeatable)",
    )
    parser.add_argument("--provider", type=_arg(deadletters.parse_provider))
    parser.add_argument("--account", type=_arg(deadletters.parse_account))
    parser.add_argument(
        "--order",
        metavar="ORDER",
        type=_arg(deadletters.parse_order),
        help="provider/account/order_id, or an order id",
    )
    for name, text in (("--since", "written at or after"), ("--until", "written before")):
        parser.add_argument(
            name,
            metavar="TIME",
            type=_arg(deadletters.parse_time),
            help=f"only those {text} TIME: ISO 8601 (UTC by default) or ago: 30m, 2h, 7d",
        )


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse type: its ValueError is the usage error's message."""

    def parsed(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parsed


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"not a rate a second above 0: {text!r}")
    return rate


def _filter(args: argparse.Namespace) -> deadletters.Filter:
    return deadletters.Filter(
        reasons=frozenset(args.reason),
        provider=args.provider,
        account=args.account,
        order=args.order,
        since=args.since,
        until=args.until,
    )


def _load(args: argparse.Namespace) -> Config:
    """The config; its `[log] format` applies unless --log-format was given."""
    config = load_config(args.config)
    if args.log_format is None:
        logs.setup(config.log.format, verbose=args.verbose)
    return config


def _query(args: argparse.Namespace) -> int:
    account = _load(args).account(args.provider, args.account)

    async def run() -> None:
        async with httpx.AsyncClient() as http:
            snapshot = await query_order(http, account, args.order_id)
        print(orjson.dumps(snapshot.to_json(), option=orjson.OPT_INDENT_2).decode())

    asyncio.run(run())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from bridge import processes, service
    from bridge.servers import listen

    config = _load(args)
    # The ports are tried before Kafka is: a port taken fails the start at once.
    host = config.http.host
    port, setting = (
        (config.http.port, "http.port")
        if args.receiver
        else (config.worker.http_port, "worker.http_port")
    )
    if port:
        listen(host, port, setting).close()
    child = None
    if args.receiver and args.worker and not args.one_process and (os.cpu_count() or 1) > 1:
        if config.worker.http_port:
            listen(host, config.worker.http_port, "worker.http_port").close()
        child = processes.worker_command(args.config, _log_options(args))
    with_parent = getattr(args, "with_parent", False)
    asyncio.run(
        service.run(
            config,
            receiver=args.receiver,
            worker=args.worker,
            worker_command=child,
            with_parent=with_parent,
        )
    )
    return 0


def _log_options(args: argparse.Namespace) -> list[str]:
    """The log options given, for a child process to log alike."""
    options = ["-v"] if args.verbose else []
    return options + (["--log-format", args.log_format] if args.log_format else [])


def _tail(args: argparse.Namespace) -> int:
    from bridge.tail import tail

    return _until_interrupted(tail(_load(args).kafka, from_beginning=args.from_beginning))


def _until_interrupted(follow: Coroutine[None, None, None]) -> int:
    """Runs a command that follows a topic until SIGINT or SIGTERM (exit code 128 + the
    signal's number, 130 for Ctrl-C), as `serve` stops: also when started with SIGINT
    ignored, as a shell starts a background job, which Python would otherwise keep."""

    async def run() -> int:
        task = asyncio.current_task()
        assert task is not None
        stopped_by: list[int] = []

        def stop(signum: int) -> None:
            stopped_by.append(signum)
            task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            await follow
        except asyncio.CancelledError:
            if not stopped_by:
                raise
        return 128 + stopped_by[0] if stopped_by else 0

    return asyncio.run(run())


def _letters(args: argparse.Namespace) -> int:
    settings = _load(args).kafka
    chosen = _filter(args)

    def show(letter: deadletters.DeadLetter) -> None:
        line = json.dumps(letter.to_json()) if args.json else letter.describe()
        print(line, flush=True)

    async def follow() -> None:
        async with deadletters.follow(settings, chosen) as letters:
            print(f"following {settings.deadletter_topic} (Ctrl-C stops)", file=sys.stderr)
            async for letter in letters:
                show(letter)

    if args.follow:
        return _until_interrupted(follow())

    async def run() -> None:
        topic = await deadletters.read_topic(settings)
        chosen_letters = deadletters.newest_first(topic.chosen(chosen))
        for letter in chosen_letters:
            show(letter)
        if not chosen_letters:
            print("no dead letters match", file=sys.stderr)

    asyncio.run(run())
    return 0


def _replay(args: argparse.Namespace) -> int:
    from bridge.replay import replay_matching

    settings = _load(args).kafka
    report = asyncio.run(
        replay_matching(settings, _filter(args), dry_run=args.dry_run, rate=args.rate)
    )
    for line in report.lines(dry_run=args.dry_run):
        print(line)
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    count = len(config.accounts)
    print(f"config ok: {count} account{'s' if count != 1 else ''}")
    if not args.probe:
        return 0

    async def probe_all() -> list[str | None]:
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*(_probe(http, a) for a in config.accounts))

    problems = asyncio.run(probe_all())
    for account, problem in zip(config.accounts, problems, strict=True):
        print(f"{account.provider}/{account.name}: {problem or 'ok'}")
    return 1 if any(problems) else 0


async def _probe(http: httpx.AsyncClient, account: Account) -> str | None:
    """None when the account's credentials work: the provider answered a signed query."""
    try:
        await query_order(http, account, PROBE_ORDER_ID)
    except OrderNotFound:
        return None
    except ProviderError as exc:
        return exc.problem  # secrets masked by bridge.query
    return None


def _broker(args: argparse.Namespace) -> int:
    from bridge.broker import EmbeddedBroker
    from bridge.servers import listen

    # Tried first: Tansu on a port taken says so only by exiting.
    if args.port:
        listen("127.0.0.1", args.port, "--port").close()
    broker = EmbeddedBroker(port=args.port or None)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        broker.start()
        try:
            await broker.wait_ready()
            print(
                f"embedded broker on {broker.bootstrap_servers} (memory only: nothing survives "
                "a restart); in the config:\n"
                f'  [kafka]\n  bootstrap_servers = "{broker.bootstrap_servers}"\n'
                "  enable_idempotence = false\n  replication_factor = 1\n"
                "Ctrl-C stops it.",
                flush=True,
            )
            exited = asyncio.create_task(broker.until_exited())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if exited.done():
                exited.result()  # raises StartupError: why it exited
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exited
        finally:
            broker.stop()

    asyncio.run(run())
    return 0


def _dev(args: argparse.Namespace) -> int:
    from bridge import dev

    asyncio.run(dev.run(once=args.once, port=args.port))
    return 0
