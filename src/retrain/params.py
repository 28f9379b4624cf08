"""The one params loader: reads params.yaml and validates it against the schema below.

Validation runs before any download or model work, so a typo (for example from
`dvc exp run -S head.learnig_rate=...`) fails at once with the key named, instead of being
silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError

from retrain.backbones import REGISTRY, check_model_params
from retrain.errors import ParamsError


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] = lambda value: True
    expect: str = ""


def _number(lo: float, hi: float, *, lo_open=False, hi_open=False, integer=False) -> Field:
    def check(value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        return above and below

    left = "(" if lo_open else "["
    right = ")" if hi_open or hi == INF else "]"  # infinity itself is refused
    kind = int if integer else (int, float)
    return Field(kind, check, f"a number in {left}{lo}, {hi}{right}")


def _choice(*options: str) -> Field:
    return Field(str, lambda value: value in options, "one of " + ", ".join(options))


def _nonempty_str() -> Field:
    return Field(str, lambda value: bool(value.strip()), "a non-empty string")


def _sha256() -> Field:
    def check(value):
        return len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())

    # A digest of digits and one `e` reads as a number in YAML: the hint says what to do.
    return Field(str, check, "64 hexadecimal digits, quoted if YAML reads them as a number")


def _folder_names() -> Field:
    def check(value):
        return all(isinstance(name, str) and name.strip("/").strip() for name in value)

    return Field(list, check, "a list of folder names or paths in the archive, such as [test]")


def _imagenet_indices() -> Field:
    def check(value):
        return all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1000 for i in value)

    return Field(list, check, "a list of ImageNet class indices in [0, 999]")


def _export_formats() -> Field:
    formats = ("float32", "float16", "int8")  # retrain.litert.QUANTIZATIONS

    def check(value):
        return bool(value) and len(set(value)) == len(value) and all(
            isinstance(name, str) and name in formats for name in value)

    return Field(list, check, "a non-empty list of distinct formats out of "
                 + ", ".join(formats))


def _gates() -> Field:
    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def is_level(value):
        # A significance level: the gate then fails only on a drop that a paired test calls
        # real at this level (retrain.report).
        return is_number(value) and 0 < value < 1

    def check(value):
        return all(
            isinstance(gate, dict)
            and {"metric", "direction", "tolerance"} <= set(gate)
            and set(gate) <= {"metric", "direction", "tolerance", "significance", "level"}
            and isinstance(gate["metric"], str)
            and gate["direction"] in ("higher", "lower")
            and is_number(gate["tolerance"])
            and gate["tolerance"] >= 0
            and ("significance" not in gate or is_level(gate["significance"]))
            # recipe: with replicates or folds, the test that weighs training noise decides
            and gate.get("level", "recipe") in ("recipe", "model")
            for gate in value
        )

    return Field(list, check, "a list of {metric, direction: higher|lower, tolerance >= 0, "
                              "optional significance in (0, 1), optional level: "
                              "recipe|model}")


INF = float("inf")

SCHEMA: dict[str, Any] = {
    "seed": _number(0, 2**31 - 1, integer=True),
    "data": {
        "url": _nonempty_str(),
        "sha256": _sha256(),
        "timeout_s": _number(0, 3600, lo_open=True),
        "retries": _number(0, 100, integer=True),
        "max_members": _number(1, INF, integer=True),
        "max_extracted_mb": _number(0, INF, lo_open=True),
        "layout": _choice("auto", "classes", "sets"),  # retrain.layout.LAYOUTS
        "unlabeled": _folder_names(),
    },
    "split": {
        "val_fraction": _number(0, 1, lo_open=True, hi_open=True),
        "test_fraction": _number(0, 1, lo_open=True, hi_open=True),
        "min_images_per_class": _number(0, INF, integer=True),
        "top_classes": _number(0, INF, integer=True),
        "seed": _number(0, 2**31 - 1, integer=True),
        "method": _choice("stratified", "hash"),
        "group_near_duplicates": Field(bool, expect="true or false"),
        "near_duplicate_bits": _number(0, 64, integer=True),
    },
    "model": {
        "backbone": _choice(*REGISTRY),
        "weights": _nonempty_str(),
        "image_size": _number(32, 1024, integer=True),
        "alpha": Field((int, float), lambda v: v in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
                       "one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4"),
    },
    "extract": {
        "batch_size": _number(1, 4096, integer=True),
        "engine": _choice("auto", "keras", "litert"),
    },
    "head": {
        "dropout": _number(0, 1, hi_open=True),
        "learning_rate": _number(0, 10, lo_open=True),
        "epochs": _number(1, 10000, integer=True),
        "batch_size": _number(1, 65536, integer=True),
        "class_weights": Field(bool, expect="true or false"),
        "early_stopping_patience": _number(0, 10000, integer=True),
    },
    "crossval": {
        "folds": Field(int, lambda v: v == 0 or 2 <= v <= 100, "0 (off) or an integer in [2, 100]"),
        "repeats": _number(0, 1000, integer=True),
        "seed": _number(0, 2**31 - 1, integer=True),
    },
    "finetune": {
        "from_layer": _number(0, 100000, integer=True),
        "lr_factor": _number(0, 100, lo_open=True),
        "epochs": _number(1, 10000, integer=True),
        "batch_size": _number(1, 4096, integer=True),
        "train_batchnorm": Field(bool, expect="true or false"),
        "path": _choice("auto", "full"),
        "cache_mb": _number(0, INF, integer=True),
        "replicates": _number(1, 100, integer=True),
        "augment": {
            "flip": Field(bool, expect="true or false"),
            "brightness": _number(0, 1),
            "contrast": _number(0, 1),
            "views": _number(0, 10000, integer=True),
        },
    },
    "accelerator": {
        "precision": _choice("auto", "float32", "mixed"),
        "gpus": _number(0, 4096, integer=True),
    },
    "render": {
        "cam_method": _choice("cam", "gradcam"),
        "cam_samples": _number(1, 64, integer=True),
        "confusion_clip": _number(0, INF),
    },
    "export": {
        "formats": _export_formats(),
        "representative_images": _number(1, 100000, integer=True),
        "int8_float_layers": _number(0, 100000, integer=True),
        "int8_size_budget": _number(0, 1, lo_open=True),
        "held_out_images": Field(int, lambda v: not isinstance(v, bool) and (v == 0 or v >= 100),
                                 "0 (all held-out images) or an integer >= 100"),
    },
    "prefilter": {
        "enabled": Field(bool, expect="true or false"),
        "imagenet_classes": _imagenet_indices(),
        "threshold": _number(0, 1),
        "model": Field(str, lambda v: v == "imagenet" or v.endswith(".keras"),
                       "imagenet or a path to a saved Keras classifier (.keras)"),
    },
    "report": {
        "gates": _gates(),
    },
    "audit": {
        "enabled": Field(bool, expect="true or false"),
        "duplicate_similarity": _number(0, 1, lo_open=True),
        "outlier_fraction": _number(0, 1),
        "outlier_neighbours": _number(1, 1000, integer=True),
        "gallery_size": _number(1, 200, integer=True),
    },
}


def validate(params: Any, schema: dict[str, Any] = SCHEMA, prefix: str = "") -> dict[str, Any]:
    """Check `params` against `schema`; raise ParamsError naming the first bad key."""
    if not isinstance(params, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'}: expected a mapping of keys")
    for key in params:
        if key not in schema:
            raise ParamsError(f"{prefix}{key}: unknown key (expected one of {', '.join(schema)})")
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if key not in params:
            raise ParamsError(f"{name}: missing")
        value = params[key]
        if isinstance(spec, dict):
            validate(value, spec, name + ".")
            continue
        # bool is an int in Python; a `true` where a number belongs is still a mistake.
        wrong_type = not isinstance(value, spec.kind) or (
            isinstance(value, bool) and spec.kind is not bool
        )
        if wrong_type or not spec.check(value):
            raise ParamsError(f"{name}: expected {spec.expect}, got {value!r}")
    return params


def read_yaml(path: str | Path) -> Any:
    """A params-style YAML file read as DVC reads `params.yaml`, or a one-line ParamsError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, label: str | Path) -> Any:
    """YAML text as DVC parses params: ruamel's safe loader, YAML 1.2. So `1e-3` is a float
    and `yes` a string (PyYAML, YAML 1.1, reads them the other way round), and a key given
    twice is an error instead of silently keeping the last value."""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        if isinstance(exc, DuplicateKeyError):
            raise ParamsError(f"{label}: {where}{problem}") from None
        raise ParamsError(f"{label}: not valid YAML ({where}{problem})") from None


def load_params(path: str | Path = "params.yaml", *, check_model: bool = True
                ) -> dict[str, Any]:
    """Read and validate the whole params file; with `check_model`, also how the `model.*`
    keys fit together (a weights file must exist: stages want that, a report does not)."""
    params = read_yaml(path)
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of params keys, got "
                          f"{'an empty file' if params is None else type(params).__name__}")
    validate(params)
    if check_model:
        check_model_params(params["model"])
    return params
