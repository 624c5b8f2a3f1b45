"""Command line: `run`, `check-config`, `version`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import __version__
from .config import ConfigError, LoadedConfig, load_config, masked_view

EXIT_CONFIG = 2


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="TOML config file (optional: environment variables alone are enough)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent2389", description="2389 Agent Protocol agent: takes tasks over MQTT and answers them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run the agent until SIGTERM/SIGINT",
                         epilog="example: agent2389 run --config agent.toml")
    _add_config_arg(run)
    check = sub.add_parser("check-config", help="validate the configuration and print it with secrets masked",
                           epilog="example: AGENT_ID=a1 OPENAI_API_KEY=sk-... agent2389 check-config")
    _add_config_arg(check)
    sub.add_parser("version", help="print the version")
    return parser


def _load_or_exit(path: Optional[str]) -> LoadedConfig:
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    for warning in loaded.warnings:
        print(f"config warning: {warning}", file=sys.stderr)
    return loaded


def _check_config(path: Optional[str]) -> int:
    loaded = _load_or_exit(path)
    for problem in loaded.run_problems:
        print(f"config warning: {problem} (`run` will refuse to start)", file=sys.stderr)
    print(json.dumps(masked_view(loaded.config), indent=2, sort_keys=True))
    return 0


def _run(path: Optional[str]) -> int:
    loaded = _load_or_exit(path)
    if loaded.run_problems:
        for problem in loaded.run_problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    from .runtime import run_agent
    return run_agent(loaded.config)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"agent2389 {__version__}")
        code = 0
    elif args.command == "check-config":
        code = _check_config(args.config)
    else:
        code = _run(args.config)
    sys.exit(code)
