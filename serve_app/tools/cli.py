"""``serve-app``: check and fetch the weights of a Serve config, and size it for a GPU.

    serve-app check CONFIG [--hub-timeout S]
    serve-app fetch CONFIG --to DIR [--out FILE] [--hub-timeout S]
    serve-app capacity CONFIG [--gpu-memory 24GiB]
    serve-app tiny-config CONFIG [--out FILE]

``check`` also prints the installed torch, diffusers, transformers, peft, ray and spandrel
and whether each is the version ``constraints.txt`` locks (serve_app/tools/versions.py).

Exit codes, the same for every command: 0 all is well; 1 a source is unusable (missing
files, no such repo or variant, a fetch that failed), a GPU is over-committed or the installed
libraries clash; 2 the config is invalid (a ConfigError, a file that is missing or not YAML, a
bad argument value). A 1 or a 2 comes with a one-line message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve_app.tools.weights import one_line

EXIT_OK, EXIT_UNUSABLE, EXIT_INVALID = 0, 1, 2


def _check(args: argparse.Namespace) -> int:
    from serve_app.tools import weights
    from serve_app.tools.versions import version_report

    versions = version_report()
    print("\n".join(versions.lines))
    refs = weights.config_sources(args.config)
    reports = weights.check_sources(refs, weights.Hub(args.hub_timeout))
    for report in reports:
        print(report.line())
    counts = {status: sum(r.status == status for r in reports)
              for status in (weights.OK, weights.NOT_CHECKED, weights.PROBLEM)}
    print(f"{len(reports)} sources: {counts[weights.OK]} usable, "
          f"{counts[weights.NOT_CHECKED]} not checked, {counts[weights.PROBLEM]} with problems")
    if counts[weights.PROBLEM] or versions.problems:
        said = [f"{counts[weights.PROBLEM]} sources with problems"] if counts[weights.PROBLEM] else []
        said += [f"library clash: {problem}" for problem in versions.problems]
        print(f"serve-app check: {one_line('; '.join(said))}", file=sys.stderr)
        return EXIT_UNUSABLE
    return EXIT_OK


def _fetch(args: argparse.Namespace) -> int:
    from serve_app.tools import weights
    from serve_app.config import ConfigError, load_app_config

    refs = weights.config_sources(args.config)
    to = Path(args.to).resolve()
    fetched, errors = weights.fetch_sources(refs, to, weights.Hub(args.hub_timeout))
    total = sum(item.nbytes for item in fetched)
    if errors:
        # A config naming half-fetched folders would fail at deploy time: write none.
        print(f"serve-app fetch: {len(errors)} sources could not be fetched; no config written "
              f"({total} bytes fetched)", file=sys.stderr)
        return EXIT_UNUSABLE
    out = Path(args.out) if args.out else to / Path(args.config).name
    serve_config = weights.rewrite_config(weights.read_serve_config(args.config), fetched)
    try:
        for application in serve_config["applications"]:
            load_app_config(application.get("args") or {})  # what is written must still load
    except ConfigError as exc:
        raise ConfigError(f"the rewritten config is invalid: {exc}") from None
    header = (f"# Written by `serve-app fetch {args.config} --to {to}`: the weights sources\n"
              f"# point at the fetched folders (stand-in sources are built at start).\n")
    try:
        weights.write_config(serve_config, out, header)
    except OSError as exc:
        print(f"serve-app fetch: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"wrote {out}")
    print(f"fetched {total} bytes ({weights.human_bytes(total)})")
    return EXIT_OK


def _capacity(args: argparse.Namespace) -> int:
    # Imported only when asked for (it builds models on the meta device).
    from serve_app.tools.capacity import capacity_command

    return capacity_command(args.config, args.gpu_memory)


def _tiny_config(args: argparse.Namespace) -> int:
    from serve_app.tools import weights

    twin = weights.tiny_twin(args.config)
    header = (f"# Tiny twin of {args.config}, written by `serve-app tiny-config`: every weights\n"
              f"# source replaced by its tiny one (built in code at start, nothing downloaded);\n"
              f"# GPU requests, replicas, batching and limits kept. Run it on a Ray cluster that\n"
              f"# declares the GPUs it asks for: ray start --head --num-cpus 16 --num-gpus 4\n")
    if args.out:
        try:
            written = weights.write_config(twin, args.out, header)
        except OSError as exc:
            print(f"serve-app tiny-config: cannot write {args.out}: {exc.strerror or exc}",
                  file=sys.stderr)
            return EXIT_UNUSABLE
        print(f"wrote {written}", file=sys.stderr)
    else:
        sys.stdout.write(header + weights.dump_config(twin))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``serve-app`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="serve-app", description="Check, fetch and size the weights of a Serve config, or write its tiny twin.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def hub_timeout(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--hub-timeout", type=float, default=10.0, metavar="S",
                         help="seconds a Hub call may take before the Hub counts as "
                              "unreachable (default: 10)")

    check = commands.add_parser(
        "check", help="validate a config and say whether each weights source is usable",
        description="Print the installed versions of torch, diffusers, transformers, peft, "
                    "ray and spandrel against the lock (constraints.txt); validate every "
                    "application's args, then check every weights source: "
                    "stand-in sources, local folders and files (the files their loader needs), "
                    "Hub repos (when the Hub answers; HF_HUB_OFFLINE=1 skips them).")
    check.add_argument("config", help="Serve config file (configs/*.yaml)")
    hub_timeout(check)
    check.set_defaults(handler=_check)

    fetch = commands.add_parser(
        "fetch", help="download the files each source needs and write a config using them",
        description="Download (or copy, for local folders) exactly the files each weights "
                    "source needs into DIR, a folder per source, and write a copy of the "
                    "config whose sources point at them: for images and hosts without network.")
    fetch.add_argument("config", help="Serve config file (configs/*.yaml)")
    fetch.add_argument("--to", required=True, metavar="DIR", help="folder to fetch into")
    fetch.add_argument("--out", metavar="FILE",
                       help="config to write (default: DIR/<name of CONFIG>)")
    hub_timeout(fetch)
    fetch.set_defaults(handler=_fetch)

    capacity = commands.add_parser("capacity", help="estimate GPU memory and replicas of a config")
    capacity.add_argument("config", help="Serve config file (configs/*.yaml)")
    capacity.add_argument("--gpu-memory", metavar="SIZE", default=None,
                          help="memory of one GPU, e.g. 24GiB")
    capacity.set_defaults(handler=_capacity)

    tiny = commands.add_parser(
        "tiny-config", help="write the config with every weights source replaced by its tiny one",
        description="The tiny twin of a config: every model, preview-decoder, VAE, LoRA and "
                    "safety-checker source replaced by its tiny one; GPU requests, replicas, "
                    "batching and limits kept, to try a cluster layout on a laptop or in tests.")
    tiny.add_argument("config", help="Serve config file (configs/*.yaml)")
    tiny.add_argument("--out", metavar="FILE", help="file to write (default: standard output)")
    tiny.set_defaults(handler=_tiny_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``serve-app`` console script; returns the exit code.

    An unreadable or invalid config (a :class:`~serve_app.config.ConfigError`, which the
    commands raise for a missing file or bad YAML too) is exit 2 with one line on stderr."""
    from serve_app.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        sys.stdout.flush()
        print(f"serve-app {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
