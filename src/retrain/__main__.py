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


def _at_least(low: int):
    """An argparse type: an integer >= `low`, refused with argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value

    return parse


def synth(argv: list[str]) -> int:
    from retrain.synthetic import write_dataset

    parser = argparse.ArgumentParser(prog="python -m retrain synth",
                                     description="Write a tarball of generated class folders.")
    parser.add_argument("dest", help="tarball to write (.tgz)")
    parser.add_argument("--classes", type=_at_least(2), default=5)
    parser.add_argument("--per-class", type=_at_least(1), default=40)
    parser.add_argument("--size", type=_at_least(8), default=96, help="image side in px")
    parser.add_argument("--seed", type=_at_least(0), default=0)
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
