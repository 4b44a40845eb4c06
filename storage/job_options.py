"""The options of an explanation job, declared once for every command that starts one.

``salient run`` explains in-process; ``salient submit`` and ``salient schedule add`` queue the same job
for workers. Both turn the option values into one message spec (``job_spec``, see storage/messages.py),
and the workers and ``run`` build their pipeline from that spec alone. Light: click, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import click

from .input_crop import CROP_MODES, INTERPOLATIONS
from .messages import SPEC_DEFAULTS

# Keys of a spec's ``options``: what each group configures (see workers/explainers.py).
METHOD_OPTIONS = ("score", "scorecam_weights", "max_channels", "masked_batch", "smooth", "noise", "steps", "baseline")
METRIC_OPTIONS = ("metrics", "metric_steps", "metric_baseline")
OVERLAY_OPTIONS = ("colormap", "alpha", "polarity", "clip_upper", "clip_lower", "overlay")
SPEC_OPTIONS = (*METHOD_OPTIONS, *METRIC_OPTIONS, *OVERLAY_OPTIONS, "localize", "overlays")
OVERLAY_FILES = ("none", "store")  # --overlays: drawn on demand only, or also stored (storage/overlay_archives.py)

DEFAULT_MODEL = "efficientnet_lite0"
LABEL_TARGET = "label"  # the --classes entry naming each image's ground-truth label
DEFAULT_METHODS = "gradcam,saliency"
DEFAULT_DATA_HELP = "default ./salient-data or SALIENT_DATA_DIR"

Command = TypeVar("Command", bound=Callable[..., Any])


def _apply(decorators: Iterable[Callable[[Command], Command]], f: Command) -> Command:
    """Apply option decorators so that --help lists them in the given order."""
    for decorator in reversed(list(decorators)):
        f = decorator(f)
    return f


def model_option(*, local: bool) -> Callable[[Command], Command]:
    what = ("efficientnet_lite0 (bundled ImageNet weights), any torchvision classifier name, timm:NAME (any timm "
            "model), your code as path/to/file.py:FUNCTION or package.module:FUNCTION (returns an nn.Module), or a "
            "TorchScript file (scripted or traced; input-gradient methods only)." if local else
            "efficientnet_lite0 (bundled ImageNet weights), any torchvision classifier name, timm:NAME, or a model "
            "factory module:function / file.py:function that the workers allow (SALIENT_MODEL_FACTORIES).")
    return click.option("--model", default=DEFAULT_MODEL, show_default=True, help=what)


def weights_option(*, local: bool) -> Callable[[Command], Command]:
    """``local``: a file here (checked now); else a path the workers can read, or a URI they download."""
    if local:
        return click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help="State-dict file for --model (loaded with weights_only=True).")
    return click.option("--weights", help="State-dict file (a path the workers can read) or an s3:// / "
                                          "http(s):// URI.")


def labels_option(*, local: bool) -> Callable[[Command], Command]:
    what = "Class names for a custom model: JSON list, or CSV rows id,name (count must match)"
    if local:
        return click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), help=f"{what}.")
    return click.option("--labels", help=f"{what}; a path the workers can read, or an s3:// / http(s):// URI.")


device_option = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")


def data_dir_option(*names: str, default: Path | None = None, note: str = "") -> Callable[[Command], Command]:
    """The data folder (embedded database and object store) as ``data_dir``; every command accepts
    ``--data``, and ``run``, ``results`` and the queue commands ``--out`` too (their older name)."""
    shown = f"default {default}" if default is not None else DEFAULT_DATA_HELP
    return click.option(*(names or ("--data",)), "data_dir", type=click.Path(path_type=Path), default=default,
                        help=f"Data folder ({shown}){note}.")


def _method_options() -> list[Callable]:
    return [
        click.option("--score", type=click.Choice(["logit", "probability"]), default=None,
                     help="Class score that gradient methods differentiate (default logit)."),
        click.option("--scorecam-weights", type=click.Choice(["probability", "logit-softmax", "cic-softmax"]),
                     default=None, help="Score-CAM channel weights definition (default probability)."),
        click.option("--max-channels", type=click.IntRange(1), default=None,
                     help="Score-CAM: keep only the N channels of largest activation variance."),
        click.option("--masked-batch", type=click.IntRange(1), default=None,
                     help="Score-CAM: masked images per forward (default: as many as a memory budget holds; "
                          "changes speed and memory, not the maps)."),
        click.option("--smooth", type=click.IntRange(0), default=None,
                     help="SmoothGrad: average input-gradient methods (saliency, integrated_gradients, "
                          "guided_backprop) over N noisy copies."),
        click.option("--noise", type=click.FloatRange(0), default=None,
                     help="SmoothGrad noise level as a fraction of the input range (e.g. 0.15)."),
        click.option("--steps", type=click.IntRange(1), default=None, help="Integrated Gradients steps."),
        click.option("--baseline", type=click.Choice(["black", "blurred"]), default=None,
                     help="Integrated Gradients baseline."),
    ]


def _output_options() -> list[Callable]:
    """Faithfulness metrics and overlay rendering (the Vertex AI / pytorch-grad-cam vocabulary)."""
    return [
        click.option("--metrics", default=None,
                     help="Faithfulness metrics per explanation, comma-separated: deletion,insertion,drop. "
                          "Cost per image and class: steps+1 forwards per curve, 1 for drop."),
        click.option("--metric-steps", type=click.IntRange(1), default=None,
                     help="Deletion/insertion steps (default 16)."),
        click.option("--metric-baseline", type=click.Choice(["black", "blurred"]), default=None,
                     help="Baseline for both curves (default: black for deletion, blurred for insertion)."),
        click.option("--colormap", default=None,
                     help="Overlay colour map: any OpenCV name (jet, viridis, turbo, ...)."),
        click.option("--alpha", type=click.FloatRange(0, 1), default=None, help="Overlay opacity (default 0.4)."),
        click.option("--polarity", type=click.Choice(["positive", "negative", "both"]), default=None,
                     help="Render the signed attribution (e.g. saliency's gradient) instead of the map."),
        click.option("--clip-upper", type=click.FloatRange(0, 100), default=None,
                     help="Percentile above which attributions saturate (default 99.9)."),
        click.option("--clip-lower", type=click.FloatRange(0, 100), default=None,
                     help="Percentile below which attributions count as zero (default 0)."),
        click.option("--overlay", type=click.Choice(["original", "grayscale", "mask-black", "none"]), default=None,
                     help="What the map is drawn on (default original)."),
        click.option("--overlays", type=click.Choice(OVERLAY_FILES), default=None,
                     help="store: also write every map's overlay PNG (drawn on the image at SALIENT_OVERLAY_MAX_SIDE), "
                          "one tar per batch beside its shard under overlays/ (default none: overlays are drawn "
                          "when asked for: salient show, salient maps --overlays, the report, the API)."),
    ]


def job_options(*, local: bool) -> Callable[[Command], Command]:
    """Every option of a job, as keyword arguments named as ``job_spec`` takes them (plus ``device``
    when ``local``). ``local``: for ``salient run`` (files must exist here; a --device); else for the
    queue, where weights and labels may be URIs and each worker picks its own device."""
    options = [
        model_option(local=local),
        weights_option(local=local),
        click.option("--layer", help="Target layer as a dotted module path (default: last spatial feature map; "
                                     "for a vision transformer, its last block's first norm)."),
        click.option("--input-size", type=click.IntRange(16, 4096), default=None,
                     help="Model input side in pixels (default: the model's own, from its metadata)."),
        click.option("--mean", default=None, help="Input normalisation mean R,G,B (default: the model's own)."),
        click.option("--std", default=None, help="Input normalisation std R,G,B (default: the model's own)."),
        click.option("--crop", type=click.Choice(CROP_MODES), default=None,
                     help="whole: the whole image to the input size; center: the short side to --resize, then a "
                          "centre crop; squash: both sides to --resize, then the crop (default: the model's own "
                          "eval transform, e.g. torchvision's resize 256 + crop 224; whole without metadata)."),
        click.option("--resize", type=click.IntRange(16, 8192), default=None,
                     help="Side before a center or squash crop (default: the model's own, or the input size / "
                          "0.875; alone it asks for a center crop)."),
        click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                     help="Resize filter: area (area-averaged down, bilinear up) or the antialiased bilinear or "
                          "bicubic of torchvision's and timm's transforms (default: the model's own; area without "
                          "metadata)."),
        click.option("--methods", default=DEFAULT_METHODS, show_default=True,
                     help="Comma-separated explanation methods, or 'all'."),
        click.option("--topk", type=click.IntRange(1, 1000), default=3, show_default=True,
                     help="Explain the K most probable classes."),
        click.option("--classes", help="Explain these classes instead of the top-k: ids or names (any case), "
                                       "comma-separated, e.g. '281,Egyptian cat'; a name with a comma: use its id. "
                                       "'label': each image's ground-truth label from the manifest."),
        click.option("--with-label", is_flag=True, default=False,
                     help="Explain each image's ground-truth label (manifest 'label') beside the top-k or --classes."),
        labels_option(local=local),
        click.option("--localize", is_flag=True, default=False,
                     help="GrabCut each map into a bounding box + mask (Simonyan 2014), stored in each record."),
        *_method_options(),
        *_output_options(),
        click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
                     help="Images per model call."),
        *([device_option] if local else []),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True),
    ]
    return lambda f: _apply(options, f)


def job_spec(*, model: str = DEFAULT_MODEL, weights: str | Path | None = None, labels: str | Path | None = None,
             layer: str | None = None, methods: str | list[str] = DEFAULT_METHODS, topk: int = 3,
             classes: str | Iterable[int | str] | None = None, precision: str = "fp32", batch_size: int = 16,
             input_size: int | None = None, mean: str | Iterable[float] | None = None,
             std: str | Iterable[float] | None = None, crop: str | None = None, resize: int | None = None,
             interpolation: str | None = None, with_label: bool = False, **options: Any) -> dict[str, Any]:
    """The spec of a job's messages from ``job_options`` values, as given: ``weights`` and ``labels``
    are kept as written (``producer.submit.build_spec`` makes them readable by the workers first).
    ``options`` are the spec's options by name (``SPEC_OPTIONS``); None and False mean "not set".
    ``classes``: ids or names ("281,tabby"), resolved against the model's class names when it loads.
    ``input_size``, ``mean``, ``std`` ("0.5,0.5,0.5" or three numbers), ``crop``, ``resize``, ``interpolation``:
    overrides of the model's preprocessing.
    The class entry ``label`` and ``with_label`` explain each image's ground-truth label (``targets.label``)."""
    preprocessing: dict[str, Any] = {} if input_size is None else {"input_size": input_size}
    preprocessing.update({key: _numbers(key, value) for key, value in (("mean", mean), ("std", std))
                          if value is not None})
    preprocessing.update({key: value for key, value in (("crop", crop), ("resize", resize),
                                                        ("interpolation", interpolation)) if value is not None})
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",")]
    classes = [int(c) if isinstance(c, str) and c.lstrip("-").isdigit() else c for c in classes or ()]
    label = with_label or LABEL_TARGET in classes
    classes = [c for c in classes if c != LABEL_TARGET]
    targets: dict[str, Any] = {"classes": classes} if classes else {} if label and not with_label else {"topk": topk}
    return {**SPEC_DEFAULTS, "model": model, "layer": layer, "methods": list(methods), "precision": precision,
            "batch_size": batch_size, "targets": {**targets, "label": True} if label else targets,
            "weights": None if weights is None else str(weights), "labels": None if labels is None else str(labels),
            "preprocessing": preprocessing or None,
            "options": {k: v for k, v in options.items() if v is not None and v is not False}}


def _numbers(name: str, value: str | Iterable[float]) -> list[float]:
    try:
        numbers = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except ValueError:
        raise click.BadParameter(f"--{name} takes three numbers R,G,B, not {value!r}") from None
    if len(numbers) != 3:
        raise click.BadParameter(f"--{name} takes three numbers R,G,B, not {len(numbers)}")
    return numbers
