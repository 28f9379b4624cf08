"""Stage `extract`: pooled features of the frozen base for every manifest row, in order."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
from pathlib import Path

from retrain.atomic import atomic_path, write_json
from retrain.errors import exits_cleanly
from retrain.manifests import SPLITS, read_split
from retrain.params import load_params
from retrain.raw import ensure_raw


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True, help="image folder written by fetch")
    parser.add_argument("--layout", help="data/layout.json: what --raw must hold, checked "
                        "and restored from the archive if missing (retrain.raw)")
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--out", required=True, help="feature folder to write")
    parser.add_argument("--details", required=True,
                        help="JSON to write: feature shape, parameter counts, throughput")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "extract")
    model_params, extract = params["model"], params["extract"]
    manifests = {split: read_split(args.manifests, split) for split in SPLITS}

    import numpy as np

    from retrain.features import base_summary, build_extractor, extract_to_file, make_engine
    from retrain.images import load_image
    from retrain.litert import PROBE_IMAGES
    from retrain.reproducibility import make_deterministic

    # Only `model.weights: none` draws anything here: the random base, whose features are
    # cached. It follows the data's seed (finetune rebuilds it from the same), so a sweep
    # over the training `seed` reuses the features.
    make_deterministic(params["split"]["seed"])
    base, extractor = build_extractor(model_params, params["split"]["seed"])
    # A LiteRT conversion is checked on a few of the images it will see, besides noise.
    probes = [load_image(Path(args.raw) / p, model_params["image_size"])
              for p in manifests["train"]["path"][:PROBE_IMAGES]]
    engine = make_engine(extract["engine"], extractor, model_params,
                         probe_images=np.stack(probes) if probes else None)
    seconds = images = 0
    with atomic_path(args.out, directory=True) as tmp:
        for split, frame in manifests.items():
            paths = [Path(args.raw) / p for p in frame["path"]]
            stats = extract_to_file(engine, paths, model_params["image_size"],
                                    extract["batch_size"], tmp / f"{split}.npy", desc=split)
            seconds += stats.seconds
            images += stats.images
    summary = base_summary(base)
    write_json(args.details, {**summary, "engine": engine.name, "images": images,
                              "images_per_second": round(images / seconds, 2)})
    print(f"extract: {images} images, {summary['feature_size']} features each, "
          f"{images / seconds:.1f} images/s ({engine.name})")


if __name__ == "__main__":
    main()
