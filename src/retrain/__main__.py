"""Command line: `python -m retrain COMMAND ...` (or `retrain COMMAND ...`).

Commands:
  predict   top-k classes for image files with a trained model
  report    Markdown params/metrics diff against a git revision, with regression gates
  synth     write a generated class-folder tarball
  profile   generate a profile's data and merge its params into params.yaml
  demo      run every stage on the small profile in a scratch copy
"""

from __future__ import annotations

import argparse
import sys

from retrain.errors import exits_cleanly


def synth(argv: list[str]) -> int:
    from retrain.synthetic import write_dataset

    parser = argparse.ArgumentParser(prog="python -m retrain synth",
                                     description="Write a tarball of generated class folders.")
    parser.add_argument("dest")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_dataset(args.dest, classes=args.classes, per_class=args.per_class,
                         size=args.size, seed=args.seed)
    print(f"wrote {path}: {args.classes} classes x {args.per_class} images, {args.size} px")
    return 0


def _commands():
    from retrain import predict, report, workspace

    return {"predict": predict.main, "report": report.main, "synth": synth,
            "profile": workspace.profile, "demo": workspace.demo}


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
