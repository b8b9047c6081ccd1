"""The ``wsdan`` command line: one entry point for the project's jobs.

Each sub-command forwards its arguments to its module's own parser, so ``wsdan pretrain
--help`` and ``python -m jobs.pretrain --help`` say the same: every command is also
``python -m MODULE`` with the module listed in ``COMMANDS`` (``wsdan data prepare`` is
``python -m jobs.prepare_data``, ``wsdan tune`` is ``python -m tuning.sweep``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "stack": ("wsdan.stack", "the local stack (S3, MLflow, Ray head): up, down, status, env, "
                             "runtime-env, logs"),
    "data prepare": ("jobs.prepare_data", "convert a data set to Parquet shards (local or s3://)"),
    "data generate": ("jobs.generate_data", "write the generated fine-grained data set"),
    "train": ("jobs.train", "the distributed training job (Ray Train, MLflow)"),
    "tune": ("tuning.sweep", "Ray Tune sweep over M, β, thresholds and lr, logged to MLflow"),
    "evaluate": ("jobs.evaluate", "evaluate a registered model or checkpoint on a split"),
    "serve": ("wsdan.serving", "serve a registered model over HTTP (mlflow models serve, "
                               "on 127.0.0.1)"),
    "pretrain": ("jobs.pretrain", "pretrain the stand-in backbone on the generated glyph task"),
    "train-local": ("jobs.train_local", "train WS-DAN in one process on the generated data set"),
    "bench-step": ("jobs.bench_step", "benchmark one training step against the backbone"),
    "bench-learning": ("jobs.bench_learning", "WS-DAN vs plain fine-tuning on generated data"),
    "bench-ingest": ("jobs.bench_ingest", "benchmark the Ray Data read-and-decode pipeline"),
    "bench-sync": ("jobs.bench_sync", "benchmark the feature-centre all-reduce per step"),
    "bench-gpu": ("jobs.bench_gpu", "the step on one GPU: precisions, memory, sync check"),
    "bench-serve": ("jobs.bench_serve", "load test of the served model: latency, images/s, "
                                        "memory, bad requests"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="wsdan",
        description="WS-DAN fine-grained classification (Hu et al. 2019), trained at scale.",
        epilog="Run 'wsdan COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # "data prepare": two words
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from wsdan import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "data" and rest and not rest[0].startswith("-"):
        command, rest = f"data {rest[0]}", rest[1:]
    elif command == "data":  # `wsdan data`, `wsdan data --help`: its sub-commands
        print("usage: wsdan data {prepare,generate} ...\n")
        for name, (_, text) in COMMANDS.items():
            if name.startswith("data "):
                print(f"  {name[5:]:<10}{text}")
        return 0 if not rest or rest[0] in ("-h", "--help") else 2
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    module = importlib.import_module(COMMANDS[command][0])
    job_parser = module.get_args_parser()
    job_parser.prog = f"wsdan {command}"
    return run_main(module.main, job_parser, rest)


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types that mean bad input or an unreachable service (found before any
    work, or naming what to fix): printed as one ``error:`` line, exit code 2, no traceback."""
    from wsdan.config import ConfigError
    from wsdan.data.decode import DecodeError
    from wsdan.data.formats._common import DatasetFormatError
    from wsdan.data.manifest import DataSourceError
    from wsdan.services._process import ManagedProcessError
    from wsdan.storage import StorageFullError
    from wsdan.weights import WeightsError

    return (ConfigError, DataSourceError, DatasetFormatError, WeightsError, DecodeError,
            StorageFullError, ManagedProcessError)


def run_main(job_main, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Run a job's ``main`` on parsed arguments. A user-facing error (:func:`user_errors`:
    bad config or input, a data set or service that cannot be reached) prints ``error:
    ...`` and returns exit code 2; anything else is a bug and keeps its traceback."""
    try:
        job_main(parser.parse_args(argv))
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
