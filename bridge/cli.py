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

    dev = commands.add_parser("dev", help="everything on this machine, no setup: a demo")
    dev.add_argument("--once", action="store_true", help="exit when the demo story is done")
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


def _dev(args: argparse.Namespace) -> int:
    from bridge import dev

    asyncio.run(dev.run(once=args.once))
    return 0
