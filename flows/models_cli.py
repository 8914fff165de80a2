"""`tuneline models`: the registry from the command line.

    tuneline models list [--name N]               every model's versions (or one model's), metrics, files, aliases
    tuneline models show VERSION|ALIAS            one model card, with its files verified
    tuneline models promote VERSION [--alias A]   point an alias (default champion) at a version
    tuneline models promote --live [--server URL] the challenger becomes champion if the server's live window of it
                                                  meets gate.live_* and its offline gates held (exit 1 if not)
    tuneline models rollback [--alias A]          point it back at the version it named before
    tuneline models history [--name N] [--json]   every alias move: when, from which version to which, by whom, why
    tuneline models register                      register models/model.onnx as `tuneline run` does after export

show, promote and rollback act on the model named by --name (default: the project's name, project.name).

Every alias move is appended to the registry's events.jsonl (`history` prints it). Changes are recorded with
`dvc add` (the registry's .dvc file); `dvc push` shares them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneline.core.config.overrides import add_override_option
from tuneline.core.registry_layout import ALIASES

COMMANDS = ("list", "show", "promote", "rollback", "history", "register")


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list, show, promote or roll back registry versions")
    add_override_option(models, "paths.registry=/srv/registry")
    commands = models.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="versions with their metrics, files and aliases")
    listing.add_argument("--name", help="one model's versions (default: every model in the registry)")
    show = commands.add_parser("show", help="one version's model card, files verified")
    show.add_argument("version", help="a version id (v0003) or an alias (champion)")
    promote = commands.add_parser("promote", help="point an alias at a version (atomic, serialised), or promote the "
                                                  "challenger on live evidence (--live)")
    promote.add_argument("version", nargs="?", help="a version id (v0003) or an alias to copy (challenger)")
    promote.add_argument("--live", action="store_true",
                         help="promote the challenger to champion only if the server's live window meets gate.live_* "
                              "and its offline gates held; exit 1 with the reason if not")
    promote.add_argument("--server", metavar="URL", default=None,
                         help="--live: the inference server (default watch.server, else http://serve.host:serve.port)")
    rollback = commands.add_parser("rollback", help="point an alias back at its previous version")
    for p in (promote, rollback):
        p.add_argument("--alias", choices=ALIASES, default="champion", help="the alias to move (default champion)")
        p.add_argument("--reason", default=None, help="why, one line (recorded in the registry's event log)")
    history = commands.add_parser("history", help="every alias move: when, from which version to which, by whom, why")
    history.add_argument("--json", action="store_true", help="one JSON object per line, as events.jsonl holds them")
    for p in (show, promote, rollback, history):
        p.add_argument("--name", help="the model name (default: the project's, project.name; history: every model)")
    commands.add_parser("register", help="register the exported model and promote it if it beats the champion")


def _record(root: Path, params, registry) -> str:
    """`dvc add` the registry after a change; a project without DVC, or DVC busy, is a note, not a failure."""
    from tuneline.tasks.versioning import VersioningError, track_folder

    try:
        with registry.locked():
            return track_folder(root, params.paths.registry)
    except VersioningError as exc:
        return f"not recorded in DVC: {exc}"
    except Exception as exc:  # DVC's own lock held by a running pipeline, for one
        return f"not recorded in DVC ({type(exc).__name__}: {exc}): run `dvc add {params.paths.registry}` later"


def _row(registry, version: str) -> list[str]:
    card = registry.card(version)
    name = registry.name
    metrics = card.get("metrics", {})
    files = ", ".join("fp32" if name == "model.onnx" else name.split(".")[1] for name in card["files"])
    size = card["files"].get("model.onnx", {}).get("bytes", 0) / 1e6
    accuracy, f1 = metrics.get("accuracy"), metrics.get("macro_f1")
    return [name, version, card.get("created", "")[:19], f"{accuracy:.4f}" if accuracy is not None else "-",
            f"{f1:.4f}" if f1 is not None else "-", f"{size:.2f}", files,
            ", ".join(registry.aliases_of(version))]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _history(folder: Path, name: str | None, as_json: bool) -> int:
    """Print the event log (core's reader only: no training stack)."""
    from tuneline.core.registry_reader import registry_events

    log = registry_events(folder, name)
    if as_json:
        for event in log.events:
            print(event.to_line(), end="")
    elif not log.events:
        which = f"model {name!r}: " if name else ""
        print(f"registry {folder}: {which}no alias has moved yet")
    else:
        rows = [[e.time[:19].replace("T", " "), e.model, e.alias, e.from_version or "-", e.to_version, e.by, e.reason]
                for e in log.events]
        _print_table([["time (UTC)", "model", "alias", "from", "to", "by", "reason"], *rows])
    if log.skipped:
        print(f"note: {log.skipped} unreadable line(s) of {folder / 'events.jsonl'} skipped (a write cut short)",
              file=sys.stderr)
    return 0


def live_server(params, server: str | None) -> str:
    """The inference server promote --live and the drift watch ask: --server, else watch.server, else serve's."""
    return server or params.watch.server or f"http://{params.serve.host}:{params.serve.port}"


def _promote_live(args: argparse.Namespace, params, root: Path) -> int:
    from tuneline.flows.environment import Environment
    from tuneline.tasks.ship.live import read_live, run_live_promote

    if args.version is not None or args.alias != "champion":
        print("tuneline: error: promote --live promotes the challenger to champion: give no VERSION or --alias",
              file=sys.stderr)
        return 2
    folder = params.paths.resolve(root).registry
    name = args.name or params.project.resolve_name(params.data)
    window = read_live(live_server(params, args.server), name, token=Environment.read().serve_token)
    result = run_live_promote(params.gate, folder, name, window)
    if not result.promoted:
        print(result.reason, file=sys.stderr)
        return 1
    print(result.reason)  # the one line of the decision on stdout; whether DVC recorded it, on stderr
    from tuneline.tasks.ship.registry import Registry

    print(_record(root, params, Registry(folder, name)), file=sys.stderr)
    return 0


def run_models(args: argparse.Namespace, params, root: Path) -> int:
    from tuneline.core.registry_reader import RegistryReader, model_names

    folder = params.paths.resolve(root).registry
    command = args.models_command
    if command == "history":
        return _history(folder, args.name, args.json)
    if command == "promote" and args.live:
        return _promote_live(args, params, root)
    if command == "promote" and args.version is None:
        print("tuneline: error: promote needs a VERSION (or --live)", file=sys.stderr)
        return 2
    if command == "list":  # core's reader only: listing imports none of the training stack
        names = [args.name] if args.name else model_names(folder)
        readers = (RegistryReader(folder, n) for n in names)
        rows = [_row(reader, v) for reader in readers for v in reader.versions()]
        if not rows:
            which = f"model {args.name!r}: " if args.name else ""
            print(f"registry {folder}: {which}no versions yet (`tuneline run` registers one after export)")
            return 0
        _print_table([["model", "version", "created", "accuracy", "macro_f1", "MB", "files", "aliases"], *rows])
        return 0
    from tuneline.tasks.ship.registry import Registry  # the writer, and verify's ONNX check

    registry = Registry(folder, getattr(args, "name", None) or params.project.resolve_name(params.data))
    if command == "show":
        version = registry.resolve(args.version)
        card = registry.verify(version)
        print(json.dumps({**card, "aliases": registry.aliases_of(version)}, indent=2))
        print(f"files verified: {', '.join(card['files'])} match their sha256 and are valid ONNX")
        return 0
    if command == "register":
        from tuneline.flows import stages

        result = stages.promote(params, root)
        print(result.reason)
    elif command == "promote":
        record = registry.promote(args.version, args.alias, by="cli",
                                  reason=args.reason or f"by hand: tuneline models promote {args.version}")
        print(f"{registry.name} {args.alias} -> {record['version']} (previous: {', '.join(record['previous']) or 'none'})")
    else:  # rollback
        record = registry.rollback(args.alias, by="cli", reason=args.reason or "by hand: tuneline models rollback")
        print(f"{registry.name} {args.alias} rolled back -> {record['version']} (previous: {', '.join(record['previous']) or 'none'})")
    print(_record(root, params, registry))
    return 0
