"""Stage `finetune`: assemble the full model, unfreeze the top of the base, train on images."""

import retrain.interrupts  # noqa: F401, E402  # isort: skip  (first: Ctrl-C exits 130)
import argparse
import json
from pathlib import Path

from retrain.atomic import atomic_path, write_json
from retrain.errors import exits_cleanly
from retrain.manifests import read_split
from retrain.params import load_params
from retrain.raw import ensure_raw


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", required=True)
    parser.add_argument("--layout", help="data/layout.json: what --raw must hold, checked "
                        "and restored from the archive if missing (retrain.raw)")
    parser.add_argument("--manifests", required=True)
    parser.add_argument("--head", required=True, help="trained head (.keras)")
    parser.add_argument("--head-details", required=True,
                        help="train_head's figures (its epochs continue the curves' axis)")
    parser.add_argument("--model", required=True, help="full model to write (.keras)")
    parser.add_argument("--serving", required=True, help="SavedModel folder to export")
    parser.add_argument("--replicates", required=True,
                        help="folder to write: replicates.json (each replicate's seed and "
                             "figures) and the weights of replicates 1..K-1")
    parser.add_argument("--live", required=True, help="dvclive folder for the curves")
    parser.add_argument("--details", required=True,
                        help="JSON to write: epochs, parameter counts, the path taken, "
                             "device and throughput")
    args = parser.parse_args()
    params = load_params()
    ensure_raw(args.raw, args.layout, "finetune")
    model_params, tune = params["model"], params["finetune"]
    splits = {split: read_split(args.manifests, split) for split in ("train", "val")}

    from dataclasses import replace

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
        fine_tune_replicates,
        lower_part_engine,
        replicate_seeds,
        replicate_weights_name,
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
                    class_weight=weights, view_seed=params["seed"])
    seeds = replicate_seeds(params["seed"], tune["replicates"])
    head_epochs = json.loads(Path(args.head_details).read_text())["epochs_run"]
    timer = TrainingThroughput(len(data["train"].labels))

    # Built, compiled and fitted in the accelerator's scope: variables on every replica,
    # layers in its precision. finetune.batch_size is the global batch.
    def replicate_models():
        for seed in seeds:
            with accelerator.scope():
                # The base extract built (its random weights, for model.weights: none,
                # follow split.seed); everything drawn from here on follows the replicate's
                # training seed (replicate 0: the run's seed).
                base = build_base(model_params, params["split"]["seed"])
                make_deterministic(seed)
                model = assemble_model(base, head)
                unfreeze_from(model, tune["from_layer"], tune["train_batchnorm"])
            models.append(model)
            yield model

    models: list = []
    with atomic_path(args.live, directory=True) as live_dir, \
            Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live, \
            accelerator.scope():
        # The curves and the throughput are replicate 0's: the model that is served.
        trained = fine_tune_replicates(
            replicate_models(), data["train"], data["val"],
            [replace(recipe, seed=seed) for seed in seeds], path=tune["path"],
            train_batchnorm=tune["train_batchnorm"], make_engine=lower_part_engine(model_params),
            cache_bytes=tune["cache_mb"] * 2**20,
            callbacks=lambda k: [CurveLogger(live, first_step=head_epochs), timer] if k == 0
            else None)
        outcomes = list(trained)
    replicates = [{"replicate": index, "seed": seed, **history_summary(outcome.history),
                   "weights": args.model if index == 0 else replicate_weights_name(index)}
                  for index, (seed, outcome) in enumerate(zip(seeds, outcomes))]
    if accelerator.mixed:  # evaluate, export and predict run them, often on a CPU
        models = [float32_copy(model) for model in models]
    model, outcome = models[0], outcomes[0]
    # The models are renamed into place together, after the slow SavedModel export: a
    # Ctrl-C during it leaves no model.keras behind.
    with atomic_path(args.model) as model_tmp, \
            atomic_path(args.serving, directory=True) as serving_tmp, \
            atomic_path(args.replicates, directory=True) as replicates_tmp:
        model.save(model_tmp)
        export_serving(model, serving_tmp)  # pixel and encoded-image signatures
        # The other replicates' weights only: their architecture is model.keras's.
        for index, other in enumerate(models[1:], start=1):
            other.save_weights(replicates_tmp / replicate_weights_name(index))
        write_json(replicates_tmp / "replicates.json", replicates)
    summary = {**history_summary(outcome.history), "path": outcome.path, **outcome.details,
               "replicates": replicates,
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
