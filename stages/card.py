"""Stage `card`: the model card (Markdown and JSON) of the fine-tuned model and its exports."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
import json
import os
from pathlib import Path

from retrain.atomic import write_json, write_text
from retrain.card import build_card, card_markdown, training_recipe
from retrain.errors import exits_cleanly
from retrain.manifests import read_classes, read_split
from retrain.params import load_params


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--model", required=True, help="fine-tuned model (.keras)")
    parser.add_argument("--tflite", required=True, help="folder of the exported .tflite files")
    parser.add_argument("--evaluate", required=True, help="evaluate's figures (details)")
    parser.add_argument("--export", required=True, help="export's figures (details)")
    parser.add_argument("--audit", required=True, help="the data audit's figures (details)")
    parser.add_argument("--out", required=True, help="the card as Markdown")
    parser.add_argument("--json", required=True, help="the card as JSON (read by predict)")
    args = parser.parse_args()
    params = load_params(check_model=False)  # describes the model; needs no weights file
    card_dir = Path(args.json).parent
    models = [Path(args.model), *sorted(Path(args.tflite).glob("*.tflite"))]
    card = build_card(
        classes=read_classes(args.manifests),
        model_params=params["model"],
        data_sha256=params["data"]["sha256"],
        split_sizes={split: len(read_split(args.manifests, split))
                     for split in ("train", "val", "test")},
        evaluate=json.loads(Path(args.evaluate).read_text()),
        export=json.loads(Path(args.export).read_text()),
        files={Path(os.path.relpath(path, card_dir)).as_posix(): path for path in models},
        training=training_recipe(params),
        audit=json.loads(Path(args.audit).read_text()),
    )
    write_json(args.json, card)
    write_text(args.out, card_markdown(card))
    print(f"card: {args.out}, {len(card['classes'])} classes, "
          f"formats {', '.join(card['formats']) or 'none'}")


if __name__ == "__main__":
    main()
