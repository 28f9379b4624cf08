"""Stage `finetune`: assemble the full model, unfreeze the top of the base, train on images."""

import argparse
import json
from pathlib import Path

from retrain.atomic import atomic_path, write_json
from retrain.errors import exits_cleanly
from retrain.manifests import read_split
from retrain.params import load_params


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--head", required=True, help="trained head (.keras)")
    parser.add_argument("--head-details", required=True,
                        help="train_head's figures (its epochs continue the curves' axis)")
    parser.add_argument("--model", required=True, help="full model to write (.keras)")
    parser.add_argument("--serving", required=True, help="SavedModel folder to export")
    parser.add_argument("--live", required=True, help="dvclive folder for the curves")
    parser.add_argument("--details", required=True,
                        help="JSON to write: epochs, parameter counts, the path taken, "
                             "device and throughput")
    args = parser.parse_args()
    params = load_params()
    model_params, tune = params["model"], params["finetune"]
    splits = {split: read_split(args.manifests, split) for split in ("train", "val")}

    import keras
    from dvclive import Live

    from retrain.accelerators import float32_copy, select_accelerator
    from retrain.augment import Augmentation
    from retrain.base import build_base
    from retrain.cache import user_cache_dir
    from retrain.finetune import (
        Recipe,
        Split,
        assemble_model,
        count_params,
        fine_tune,
        lower_part_engine,
        unfreeze_from,
    )
    from retrain.images import cached_image_array, image_rows
    from retrain.reproducibility import make_deterministic
    from retrain.serving import export_serving
    from retrain.training import (
        CurveLogger,
        TrainingThroughput,
        balanced_class_weights,
        history_summary,
    )

    make_deterministic(params["seed"])
    accelerator = select_accelerator(params["accelerator"])
    head = keras.models.load_model(args.head)
    data = {}
    for split, frame in splits.items():
        images = cached_image_array([Path(args.raw) / p for p in frame["path"]],
                                    frame["sha256"], model_params["image_size"],
                                    user_cache_dir("images"))
        data[split] = Split(image_rows(images), frame["label_index"].to_numpy("int64"))
    weights = balanced_class_weights(data["train"].labels, head.output.shape[-1]) \
        if params["head"]["class_weights"] else None
    recipe = Recipe(learning_rate=params["head"]["learning_rate"] * tune["lr_factor"],
                    epochs=tune["epochs"], batch_size=tune["batch_size"], seed=params["seed"],
                    augmentation=Augmentation.from_params(tune["augment"]),
                    class_weight=weights)
    head_epochs = json.loads(Path(args.head_details).read_text())["epochs_run"]
    timer = TrainingThroughput(len(data["train"].labels))

    # Built, compiled and fitted in the accelerator's scope: variables on every replica,
    # layers in its precision. finetune.batch_size is the global batch.
    with accelerator.scope():
        # The base extract built (its random weights, for model.weights: none, follow
        # split.seed); everything drawn from here on follows the training seed.
        base = build_base(model_params, params["split"]["seed"])
        make_deterministic(params["seed"])
        model = assemble_model(base, head)
        unfreeze_from(model, tune["from_layer"], tune["train_batchnorm"])
        with atomic_path(args.live, directory=True) as live_dir, \
                Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
            outcome = fine_tune(model, data["train"], data["val"], recipe, path=tune["path"],
                                train_batchnorm=tune["train_batchnorm"],
                                make_engine=lower_part_engine(model_params),
                                cache_bytes=tune["cache_mb"] * 2**20,
                                callbacks=[CurveLogger(live, first_step=head_epochs), timer])
    if accelerator.mixed:
        model = float32_copy(model)  # evaluate, export and predict run it, often on a CPU
    # Both models are renamed into place together, after the slow SavedModel export: a
    # Ctrl-C during it leaves no model.keras behind.
    with atomic_path(args.model) as model_tmp, \
            atomic_path(args.serving, directory=True) as serving_tmp:
        model.save(model_tmp)
        export_serving(model, serving_tmp)  # pixel and encoded-image signatures
    summary = {**history_summary(outcome.history), "path": outcome.path, **outcome.details,
               "params": count_params(model),
               "from_layer": tune["from_layer"],
               "from_layer_name": model.get_layer("backbone").layers[tune["from_layer"]].name,
               **accelerator.summary(), "train_images_per_second": timer.images_per_second()}
    write_json(args.details, summary)
    print(f"finetune: val_accuracy {summary.get('val_accuracy', float('nan')):.4f}, "
          f"{summary['params']['trainable']:,} trainable params, {outcome.path} path, "
          f"{accelerator.precision} on {accelerator.description} "
          f"({accelerator.replicas} replica(s)), "
          f"{summary['train_images_per_second']} training images/s")


if __name__ == "__main__":
    main()
