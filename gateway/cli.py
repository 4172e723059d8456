"""`realtime-gateway` — one console script, three commands.

    realtime-gateway [flags]            run a gateway node (the default command)
    realtime-gateway mock [flags]       run the standalone mock OpenAI Realtime server
    realtime-gateway client [flags]     demo client: stream a WAV, print events, save the reply

Each command's flags are defined by the module that owns it (`add_arguments(parser)`), and
each runs with `run(args) -> exit code`; this module only dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> module providing add_arguments(parser) and run(args)
COMMANDS = {
    "serve": "gateway.node",
    "mock": "gateway.mock.cli",
    "client": "gateway.demo_client",
}
DEFAULT_COMMAND = "serve"

_HELP = {
    "serve": "run a gateway node (default when no command is given)",
    "mock": "run the standalone mock OpenAI Realtime server",
    "client": "demo client: stream a WAV file in real time, print events, write the reply audio",
}


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser with every command listed and `command`'s flags defined. Only that command's
    module is imported: a node must not load the mock's and demo client's numpy (its import alone
    starts OpenBLAS threads, and a multi-threaded process pays more per socket syscall)."""
    parser = argparse.ArgumentParser(
        prog="realtime-gateway",
        description="Relay full-duplex voice sessions between WebSocket clients and OpenAI's Realtime API.",
        epilog="`serve` is the default command: `realtime-gateway --port 3001` runs a node. Each "
               "command documents its flags (`serve`'s also have GATEWAY_* environment twins): "
               "realtime-gateway serve --help | mock --help | client --help",
    )
    commands = parser.add_subparsers(dest="command", metavar="{serve,mock,client}")
    for name, module_name in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=_HELP[name],
            description=_HELP[name],
            formatter_class=_DefaultsHelpFormatter,
        )
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" except where the default is None: the node's flags use None for
    "not given" and state their real default (and environment twin) in their own help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Where numpy is loaded (the mock, the demo client, the pure fast path) its OpenBLAS would
    # start a thread per core. None of these programs does BLAS work, and a single-threaded node
    # pays less per socket syscall (see gateway.sockets). Must be set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # `realtime-gateway --port 3001` means `realtime-gateway serve --port 3001`.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, DEFAULT_COMMAND)
    command = argv[0] if argv[0] in COMMANDS else DEFAULT_COMMAND
    args = build_parser(command).parse_args(argv)
    return importlib.import_module(COMMANDS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
