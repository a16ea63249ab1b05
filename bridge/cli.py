"""The `order-bridge` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import httpx
import orjson

from bridge import __version__, providers
from bridge.config import load_config
from bridge.errors import BridgeError, ConfigError
from bridge.query import query_order


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka logs every failed reconnect (ten a second while Kafka is away); the
    # bridge says once what is wrong, and /readyz tells.
    logging.getLogger("aiokafka").setLevel(logging.WARNING if args.verbose else logging.CRITICAL)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"order-bridge: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"order-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="order-bridge",
        description="Providers' callbacks in, confirmed order-status events out.",
    )
    parser.add_argument("--version", action="version", version=f"order-bridge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    query = commands.add_parser("query", help="one signed order-detail query; prints the snapshot")
    query.add_argument("provider", choices=providers.names())
    query.add_argument("account")
    query.add_argument("order_id")
    _add_config_option(query)
    query.set_defaults(run=_query)

    for name, receiver, worker, text in (
        ("serve", True, True, "run the receiver and the worker in one process (the usual run)"),
        ("receiver", True, False, "run only the receiver: callbacks into the inbox"),
        ("worker", False, True, "run only the worker: inbox hints into status events"),
    ):
        command = commands.add_parser(name, help=text)
        _add_config_option(command)
        command.set_defaults(run=_serve, receiver=receiver, worker=worker)

    tail = commands.add_parser("tail", help="follow the status topic, one line an event")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest event")
    _add_config_option(tail)
    tail.set_defaults(run=_tail)

    replay = commands.add_parser(
        "replay", help="write dead letters back into the inbox, to be confirmed again"
    )
    replay.add_argument(
        "--reason", action="append", default=[], help="only this reason (repeatable)"
    )
    replay.add_argument("--order", metavar="KEY", help="only this order: provider/account/id")
    replay.add_argument("--dry-run", action="store_true", help="count, write nothing")
    _add_config_option(replay)
    replay.set_defaults(run=_replay)

    dev = commands.add_parser("dev", help="everything on this machine, no setup: a demo")
    dev.add_argument("--once", action="store_true", help="exit when the demo story is done")
    dev.add_argument("--port", type=int, default=0, help="the bridge's HTTP port (default: free)")
    dev.set_defaults(run=_dev)
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="the TOML config (default: $ORDER_BRIDGE_CONFIG)"
    )


def _query(args: argparse.Namespace) -> int:
    account = load_config(args.config).account(args.provider, args.account)

    async def run() -> None:
        async with httpx.AsyncClient() as http:
            snapshot = await query_order(http, account, args.order_id)
        print(orjson.dumps(snapshot.to_json(), option=orjson.OPT_INDENT_2).decode())

    asyncio.run(run())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from bridge import service

    config = load_config(args.config)
    asyncio.run(service.run(config, receiver=args.receiver, worker=args.worker))
    return 0


def _tail(args: argparse.Namespace) -> int:
    from bridge.tail import tail

    asyncio.run(tail(load_config(args.config).kafka, from_beginning=args.from_beginning))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from bridge.replay import replay

    settings = load_config(args.config).kafka
    counts = asyncio.run(
        replay(settings, reasons=args.reason, order_key=args.order, dry_run=args.dry_run)
    )
    verb = "would replay" if args.dry_run else "replayed"
    by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    print(f"{verb} {sum(counts.values())} dead letters" + (f" ({by_reason})" if counts else ""))
    return 0


def _dev(args: argparse.Namespace) -> int:
    from bridge import dev

    asyncio.run(dev.run(once=args.once, port=args.port))
    return 0
