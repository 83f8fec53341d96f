"""The ``edgetl`` command: flags -> a config dataclass -> a stage -> an exit code.

Bad input prints one line and exits 2; a failed verification exits 1. Stages are imported inside
the commands so that ``edgetl --help`` loads no TensorFlow.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer

from edgetl.config import (Distribute, IOType, Monitor, Pooling, Preset, QatRanges, QatScope,
                           Quantization, Strategy)
from edgetl.errors import EdgetlError

def _parse_error_line(e, args: list) -> str:
    """typer's own parse error as edgetl's one line: ``--epochs: 'nan' is not an integer``."""
    import re

    from typer._click import exceptions as cx

    text = e.format_message()
    param = getattr(e, "param", None)
    if isinstance(e, cx.MissingParameter) and param is not None:
        name = param.opts[0] if param.param_type_name == "option" else param.name.upper()
        return f"{name} is required (see '{e.ctx.command_path} --help')" if e.ctx else \
            f"{name} is required"
    if isinstance(e, cx.BadParameter) and param is not None:
        opts = list(getattr(param, "opts", []) or [])
        name = opts[0] if param.param_type_name == "option" and opts else param.name.upper()
        value = None
        for i, a in enumerate(args):
            for o in opts:
                if a == o and i + 1 < len(args):
                    value = args[i + 1]
                elif a.startswith(o + "="):
                    value = a[len(o) + 1:]
        kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        inner = [t for t in getattr(kind, "__args__", ()) if t is not type(None)]
        kind = inner[0] if inner else kind
        shown = "" if value is None else f"{value!r} "
        if kind is int:
            return f"{name}: {shown}is not an integer"
        if kind is float:
            return f"{name}: {shown}is not a number"
        choices = re.search(r"is not one of (.*?)\.?$", e.message)
        if choices:
            return f"{name}: {shown}is not one of {choices.group(1)}"
        return f"{name}: {shown}{e.message.rstrip('.')}".replace(": Value error, ", ": ")
    hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
    text = text.rstrip(".")
    return f"{text[:1].lower()}{text[1:]}{hint}"


class _Group(typer.core.TyperGroup):
    """Turns every parse error of every command into one ``error: ...`` line, exit 2 (typer's
    default is a usage line and a box)."""

    def make_context(self, info_name, args, parent=None, **extra):
        return self._one_line(args, super().make_context, info_name, args, parent=parent,
                              **extra)

    def invoke(self, ctx):
        return self._one_line(list(ctx.protected_args if hasattr(ctx, "protected_args") else [])
                              + list(ctx.args), super().invoke, ctx)

    @staticmethod
    def _one_line(args, fn, *a, **kw):
        from typer._click import exceptions as cx

        try:
            return fn(*a, **kw)
        except cx.NoArgsIsHelpError:
            raise
        except cx.UsageError as e:
            typer.echo(f"error: {_parse_error_line(e, list(args or []))}", err=True)
            raise typer.Exit(2) from None


class _Command(typer.core.TyperCommand):
    """Every command's class (set at the end of this module). Help shows a list argument as
    ``MODEL... <path>``, as a single one shows ``MODEL <path>`` (typer 0.29 prints its Python
    type, ``MODEL <list[Path]>``, and has no setting for it). Before the command runs, a path
    that is a symlink loop is refused by name: ``exists()`` is False for it, which stages would
    call "not found"."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for p in self.params:
            if p.param_type_name == "argument" and p.nargs == -1:
                item = p.type_descriptor.annotation.__args__[0]
                shown = f"<{'path' if item is Path else p._bare_type(item)}>"
                p.display_type = lambda ctx, shown=shown: shown
                p._rich_display_name = lambda name=f"{p.metavar or p.name.upper()}...": name

    def invoke(self, ctx):
        from edgetl.runner import path_problem, symlink_loop

        for p in self.params:
            kind = p.type_descriptor.annotation
            kind = next((k for k in getattr(kind, "__args__", ()) if k is not type(None)), kind)
            kind = next(iter(getattr(kind, "__args__", ())), kind)  # List[Path] -> Path
            # paths, and the free strings whose metavar says they may be one (--weights PATH)
            if kind is not Path and not any(w in (p.metavar or "") for w in ("PATH", "FILE")):
                continue
            value = ctx.params.get(p.name)
            name = p.opts[0] if p.param_type_name == "option" else p.metavar or p.name.upper()
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v and symlink_loop(v):
                    _fail(f"{path_problem(v, name)}; give the real path")
        return super().invoke(ctx)


# Help conventions (every command and option): -h and --help; plain text, wrapped to the
# terminal (no rich boxes: they squeezed and hid text at 80 columns, and read "[...]" in help as
# markup); every option that takes a value shows its default (an Option whose default is None
# says what None means: show_default="the backbone's"); a fixed set of values is an Enum (typer
# lists it) or, for a free string, a metavar "[a|b|c]"; each command ends with `_examples(...)`.
# Sizes are MB = 10^6 bytes everywhere. tests/test_cli_help.py checks all of it.
CONTEXT = {"help_option_names": ["-h", "--help"]}


def _examples(*lines: str) -> str:
    """A command's epilog: one-line examples, kept as written (click's \b: no re-wrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=_Group, rich_markup_mode=None, context_settings=CONTEXT,
                  help="Transfer learning to verified int8 TFLite for Raspberry Pi and Coral.",
                  epilog=_examples("edgetl data synth shapes/", "edgetl train --data shapes/ "
                                   "--weights none --out runs/shapes",
                                   "edgetl export runs/shapes --int8",
                                   "edgetl bench runs/shapes/export/*.tflite --data shapes/"))
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                       help="Built-in datasets: generated shapes, IDX.",
                       epilog=_examples("edgetl data synth shapes/ --classes 4",
                                        "edgetl data idx images.gz labels.gz fashion/"))
app.add_typer(data_app, name="data")


def _backbone_names() -> list:
    from edgetl.backbones import REGISTRY  # data only: no TensorFlow

    return list(REGISTRY)


def _version(value: bool) -> None:
    if value:
        from edgetl import __version__

        typer.echo(f"edgetl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print edgetl's version and exit.")) -> None:
    """Transfer learning to verified int8 TFLite for Raspberry Pi and Coral."""


def _fail(message: str, code: int = 2) -> None:
    from edgetl.runner import printable  # names from files must not drive the terminal

    typer.echo(f"error: {printable(message)}", err=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Runs a stage; turns edgetl's and the runner's errors into one line and an exit code."""
    from edgetl.runner import RunnerError

    try:
        return fn(*args, **kwargs)
    except EdgetlError as e:
        _fail(str(e), e.exit_code)
    except RunnerError as e:
        _fail(str(e), 2)
    except OSError as e:  # the last resort: a full disk or a folder that vanished mid-run
        where = f" '{e.filename}'" if e.filename else ""
        _fail(f"cannot read or write{where}: {e.strerror or e}")
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _numbers(flag: str, text: Optional[str]) -> Optional[tuple]:
    """'123.7,116.3,103.5' (or spaces) -> floats; one line and exit 2 for anything else."""
    if text is None:
        return None
    parts = text.replace(",", " ").split()
    try:
        return tuple(float(p) for p in parts) or _fail(f"{flag} is empty: give 1 or 3 numbers")
    except ValueError:
        _fail(f"{flag} '{text}' is not a number list: give 1 or 3 numbers, e.g. "
              f"{flag} 127.5 or {flag} 123.7,116.3,103.5")


def _check_outputs(outputs, inputs=(), folders=(), plots=None) -> None:
    """Output files refused before any work: unwritable, a folder, one named twice, an input
    of the command (model, image, labels, run file) or inside a --data folder; --plots: a
    folder that can be created and written."""
    from edgetl import runner as r

    files = [(str(p), flag) for p, flag in outputs if p]
    extra = [(str(plots), "--plots")] if plots else []
    _guard(r.check_outputs, files + extra, [str(i) for i in inputs if i],
           [(str(d), flag) for d, flag in folders if d])
    for path, flag in files:
        _guard(r.check_writable, path, flag)
    if plots:
        plots = Path(plots)
        if plots.exists() and not plots.is_dir():
            _fail(f"cannot write --plots {plots}: it is a file; give a folder")
        top = plots
        while not top.exists() and top != top.parent:
            top = top.parent
        if not top.is_dir() or not os.access(top, os.W_OK | os.X_OK):
            _fail(f"cannot write --plots {plots}: '{top}' is not a writable folder")
        if plots.is_dir():
            _guard(r.check_writable, str(plots / "plot.png"), "--plots")


def _reraise(e: BaseException):
    raise e


@app.command(short_help="Fine-tune a backbone on labelled image folders (optionally QAT).",
             epilog=_examples(
    "edgetl train --data photos/ --out runs/flowers",
    "edgetl train --data photos/ --strategy two-phase --qat --out runs/flowers",
    "edgetl train --data shapes/ --weights none --alpha 0.35 --input-size 64"))
def train(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, help="Folder with one sub-folder of images per "
                                                   "class (with --resume: the run's).",
                                        show_default="none: required unless --resume"),
    backbone: str = typer.Option("mobilenetv2", metavar="NAME",
                                 help=f"One of {', '.join(_backbone_names())} (`edgetl "
                                      "backbones`: sizes, preprocessing, QAT)."),
    out: Optional[Path] = typer.Option(None, help="Run directory.",
                                       show_default="runs/<backbone>-<time>"),
    base_model: Optional[Path] = typer.Option(None, help="Your own saved model as the backbone.",
                                              show_default="none: --backbone"),
    cut_layer: Optional[str] = typer.Option(None, help="Layer of --base-model that feeds the head.",
                                            show_default="the last 4D tensor below its head"),
    unsafe: bool = typer.Option(False, help="Allow Lambda layers / custom code in --base-model."),
    weights: str = typer.Option("imagenet", metavar="<imagenet|none|PATH>",
                                help="ImageNet, from scratch, or a weights file."),
    alpha: Optional[float] = typer.Option(None, help="MobileNet width multiplier.",
                                          show_default="1.0; MobileNets only"),
    input_size: Optional[str] = typer.Option(None, help="Input size in px: N or HxW (height x "
                                                        "width, e.g. 160x120).",
                                             show_default="the base model's fixed size, else "
                                                          "the backbone's"),
    channels: Optional[int] = typer.Option(None, help="1 (greyscale) or 3.",
                                           show_default="the base model's, else 3"),
    preprocessing: Preset = typer.Option(Preset.auto, help="How pixels become model input: "
                                                           "auto = detected from the base "
                                                           "model's first layers (Rescaling, "
                                                           "Normalization, preprocess_input) or "
                                                           "the backbone's preset; tf = x/127.5-1,"
                                                           " torch = ImageNet mean/std, caffe = "
                                                           "BGR minus mean, raw = 0..255."),
    mean: Optional[str] = typer.Option(None, help="Mean on 0..255 pixels: one number or R,G,B "
                                                  "(model input = (x - mean) / std).",
                                       show_default="the preprocessing's"),
    std: Optional[str] = typer.Option(None, help="Std on 0..255 pixels: one number or R,G,B.",
                                      show_default="the preprocessing's"),
    val_data: Optional[Path] = typer.Option(None, help="Separate validation folder.",
                                            show_default="none: --val-split"),
    val_split: Optional[float] = typer.Option(None, help="Held-out fraction per class.",
                                              show_default="0.2"),
    strategy: Optional[Strategy] = typer.Option(
        None, help="feature-extract: frozen base; fine-tune: its top layers (--unfreeze); "
                   "two-phase: the head first, then fine-tune.",
        show_default="feature-extract with pretrained weights; fine-tune of every layer with "
                     "--weights none"),
    unfreeze: Optional[int] = typer.Option(None, help="Top base layers to train.",
                                           show_default="a fifth of the base; all with "
                                                        "--weights none"),
    unfreeze_from: Optional[str] = typer.Option(None, help="First base layer to train.",
                                                show_default="none: --unfreeze"),
    epochs: int = typer.Option(10, help="Epochs (first phase of two-phase)."),
    fine_tune_epochs: int = typer.Option(10, help="Epochs of the fine-tune phase (two-phase)."),
    lr: Optional[float] = typer.Option(
        None, help="Learning rate (head training; from scratch, every phase).",
        show_default="pretrained 1e-3, from scratch 3e-3"),
    fine_tune_lr: Optional[float] = typer.Option(
        None, help="Learning rate when base layers train (1e-4: on real ImageNet weights, "
        "EfficientNet-Lite0, 100 images per class, 1.3 points more int8 top-1 than 1e-5).",
        show_default="pretrained 1e-4, from scratch --lr"),
    batch_size: int = typer.Option(32, help="Images per step (the global batch over all "
                                            "replicas)."),
    head: str = typer.Option("", help="Extra head layers: 'conv:64,dense:128,dropout:0.2'.",
                             show_default="none"),
    pooling: Pooling = typer.Option(Pooling.avg, help="How the base's feature map becomes a "
                                                      "vector."),
    dropout: float = typer.Option(0.2, help="Dropout before the classifier."),
    qat: bool = typer.Option(False, help="Quantization-aware training (tfmot)."),
    qat_scope: QatScope = typer.Option(
        QatScope.all, help="Fake-quantize all layers (frozen ones too), or only the layers "
        "that train (and their BN). On a real ImageNet base, all gave +0.8 points of int8 "
        "top-1 over trained (9 seeds, 95 % interval +0.2..+1.3); a QAT step costs 1.4-1.5x a "
        "float step with all, 1.1-1.3x with trained."),
    qat_ranges: QatRanges = typer.Option(
        QatRanges.data, help="Start of the QAT activation ranges: data = min/max of a "
        "calibration pass over 200 training images, frozen layers' ranges then fixed; "
        "data-adapt = the same, all ranges then adapt; tfmot = tfmot's [-6, 6] (clips "
        "pretrained activations)."),
    augment: Optional[str] = typer.Option(
        None, metavar="LIST", help="Augmentations: comma-separated flip,rotate,zoom,contrast, "
                                   "or none.", show_default="rotate,zoom,contrast"),
    no_augment: bool = typer.Option(False, "--no-augment", help="Same as --augment none."),
    monitor: Monitor = typer.Option(Monitor.val_accuracy, help="What picks the best epoch, "
                                                               "whose weights are kept."),
    patience: Optional[int] = typer.Option(None, help="Stop a phase after N epochs without a "
                                                      "better one.", show_default="never"),
    class_weights: str = typer.Option("none", metavar="<none|auto>",
                                      help="auto: weights inverse to class frequency."),
    strict: bool = typer.Option(False, help="Unreadable images are an error, not skipped."),
    seed: int = typer.Option(0, help="Seed of splits, shuffling, augmentation and initial "
                                     "weights."),
    resume: bool = typer.Option(False, help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    quiet: bool = typer.Option(False, help="No progress output."),
    verbose: bool = typer.Option(False, help="Each epoch's line also gives the training loss "
                                             "and accuracy."),
    distribute: Distribute = typer.Option(Distribute.auto, help="tf.distribute strategy: auto "
                                          "(mirrored on >1 GPU), none, mirrored, multi-worker "
                                          "(TF_CONFIG); --batch-size is the global batch."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Feature cache: where the "
                               "lower layers are frozen and --augment is none, compute their "
                               "output once per image and train the rest on it (the same "
                               "weights, up to float rounding; in memory up to 1 GiB, beyond "
                               "that on disk in the run, removed after). Off with "
                               "augmentation (images change every epoch) and in QAT phases."),
) -> None:
    """Fine-tune a backbone on a folder of labelled images (optionally with QAT)."""
    from edgetl.config import TrainConfig

    if resume and out is None:
        _fail("--resume needs --out RUN (the run directory to continue)")
    if data is None and not resume:
        _fail("--data is required: a folder with one sub-folder of images per class")
    from typer._click.core import ParameterSource

    # With --resume, each flag typed on the command line must match the run's own setting.
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    cfg = TrainConfig(
        data=str(data) if data is not None else "", out=str(out) if out else None, backbone=backbone,
        base_model=str(base_model) if base_model else None, cut_layer=cut_layer, unsafe=unsafe,
        weights=weights, alpha=alpha,
        input_size=int(input_size) if input_size and input_size.strip().isdigit() else input_size,
        channels=channels, preprocessing=preprocessing,
        mean=_numbers("--mean", mean), std=_numbers("--std", std),
        val_data=str(val_data) if val_data else None, val_split=val_split, strategy=strategy,
        unfreeze=unfreeze, unfreeze_from=unfreeze_from, epochs=epochs,
        fine_tune_epochs=fine_tune_epochs, lr=lr, fine_tune_lr=fine_tune_lr,
        batch_size=batch_size, head=head, pooling=pooling, dropout=dropout, qat=qat,
        qat_scope=qat_scope, qat_ranges=qat_ranges, augment=not no_augment, augmentations=augment,
        class_weights=class_weights, strict=strict, seed=seed, resume=resume,
        overwrite=overwrite, quiet=quiet, monitor=monitor, patience=patience)
    cfg = replace(cfg, distribute=distribute, cache=cache, verbose=verbose)
    from edgetl.train import train as run_train

    result = _guard(run_train, cfg, given)
    if result.warning:
        from edgetl.runner import printable

        typer.echo(f"warning: {printable(result.warning)}", err=True)
    typer.echo(f"run: {result.run_dir}  val_accuracy: {result.val_accuracy:.4f}  "
               f"epochs: {result.epochs_done}{'  (QAT)' if result.qat else ''}"
               f"{f'  best epoch: {result.best_epoch}' if result.best_epoch else ''}")


@app.command(short_help="List the backbones, or one model's layers (--layers).",
             epilog=_examples("edgetl backbones",
                              "edgetl backbones mobilenetv2 --layers",
                              "edgetl backbones mobilenetv2 --layers --strategy fine-tune",
                              "edgetl backbones --base-model my_model.keras --layers --json"))
def backbones(
    name: Optional[str] = typer.Argument(None, metavar="NAME",
                                         help="One backbone (default: all)."),
    layers: bool = typer.Option(False, "--layers", help="List the layers of NAME or "
                                "--base-model: index, name, type, output shape, parameters and "
                                "whether it trains under --strategy."),
    base_model: Optional[Path] = typer.Option(None, help="Your own saved model (with --layers).",
                                              show_default="none: NAME"),
    cut_layer: Optional[str] = typer.Option(None, help="Layer of --base-model that feeds the "
                                                       "head.",
                                            show_default="the last 4D tensor below its head"),
    unsafe: bool = typer.Option(False, help="Allow Lambda layers / custom code in --base-model."),
    input_size: Optional[str] = typer.Option(None, help="Input size in px: N or HxW.",
                                             show_default="the base model's fixed size, else "
                                                          "the backbone's"),
    alpha: Optional[float] = typer.Option(None, help="MobileNet width multiplier.",
                                          show_default="1.0; MobileNets only"),
    weights: str = typer.Option("imagenet", metavar="<imagenet|none|PATH>",
                                help="As train's: decides the default strategy and whether "
                                     "BatchNorm trains (no weights are loaded)."),
    strategy: Optional[Strategy] = typer.Option(None, help="As train's.",
                                                show_default="as train's"),
    unfreeze: Optional[int] = typer.Option(None, help="As train's.", show_default="as train's"),
    unfreeze_from: Optional[str] = typer.Option(None, help="As train's.",
                                                show_default="none: --unfreeze"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the supported backbones (input size, ImageNet sizes, preprocessing, QAT), or with
    --layers the layers of one backbone or base model."""
    from edgetl.backbones import get_backbone, table

    given = [flag for flag, value in (("--base-model", base_model), ("--cut-layer", cut_layer),
                                      ("--unsafe", unsafe or None), ("--input-size", input_size),
                                      ("--alpha", alpha), ("--strategy", strategy),
                                      ("--unfreeze", unfreeze),
                                      ("--unfreeze-from", unfreeze_from),
                                      ("--weights", None if weights == "imagenet" else weights))
             if value is not None]
    if given and not layers:
        _fail(f"{given[0]} applies to a layer list: add --layers (edgetl backbones NAME --layers "
              f"{given[0]} ...)")
    if not layers:
        rows = table()
        if name is not None:
            wanted = _guard(get_backbone, name).name
            rows = [r for r in rows if r["name"] == wanted]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        typer.echo("  ".join(c.ljust(widths[c]) for c in cols))
        for r in rows:
            typer.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
        if name is not None:
            typer.echo(f"(edgetl backbones {rows[0]['name']} --layers lists its layers)")
        return
    if (name is None) == (base_model is None):
        _fail("--layers lists one model: give a backbone name (edgetl backbones mobilenetv2 "
              "--layers) or --base-model FILE" + (", not both" if name else ""))
    from edgetl.config import TrainConfig
    from edgetl.train import layer_table

    cfg = TrainConfig(data="", backbone=name or "mobilenetv2",
                      base_model=str(base_model) if base_model else None, cut_layer=cut_layer,
                      unsafe=unsafe, weights=weights, alpha=alpha,
                      input_size=int(input_size) if input_size and input_size.strip().isdigit()
                      else input_size, strategy=strategy, unfreeze=unfreeze,
                      unfreeze_from=unfreeze_from, quiet=True)
    report = _guard(layer_table, cfg)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from edgetl.runner import printable

    shape = "x".join(map(str, report["input_shape"]))
    alpha_text = f", alpha {report['alpha']:g}" if report["alpha"] is not None else ""
    typer.echo(f"{printable(str(report['backbone']))}: input {shape}{alpha_text}, "
               f"{len(report['layers']) - 1} layers; --strategy {report['strategy']} with "
               f"--weights {report['weights']} trains {report['trains']}")
    rows = [(str(r["index"]), printable(r["name"]), r["type"], r["output_shape"],
             f"{r['params']:,}", "yes" if r["trainable"] else "no") for r in report["layers"]]
    head = ("index", "name", "type", "output", "params", "trains")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    for r in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@app.command(short_help="Convert a run to TFLite and verify it (integer ops, accuracy).",
             epilog=_examples("edgetl export runs/flowers --int8",
                              "edgetl export runs/flowers --int8 --float32 --io int8",
                              "edgetl export runs/flowers --int8 --edgetpu"))
def export(
    run: Path = typer.Argument(..., metavar="RUN", help="Training run directory."),
    int8: bool = typer.Option(False, "--int8", help="Full-integer int8 (calibrated)."),
    float32: bool = typer.Option(False, "--float32", help="Plain float32."),
    float16: bool = typer.Option(False, "--float16", help="float16 weights."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic-range (int8 weights)."),
    int16x8: bool = typer.Option(False, "--int16x8", help="int16 activations, int8 weights."),
    io: IOType = typer.Option(IOType.uint8, help="I/O type of integer models (uint8: "
                              "MediaPipe, Coral, LiteRT; int8: LiteRT only)."),
    num_calibration: int = typer.Option(200, help="Calibration images (class-balanced)."),
    calibration: Optional[Path] = typer.Option(None, help="Your own calibration folder.",
                                               show_default="a sample of the training images"),
    calibration_manifest: Optional[Path] = typer.Option(None, help="Replay a calibration.",
                                                        show_default="none"),
    max_drop: float = typer.Option(2.0, help="Largest accepted top-1 drop, in points."),
    edgetpu: bool = typer.Option(False, help="Report Edge TPU compatibility op by op; fail "
                                             "unless every op maps to the Edge TPU."),
    edgetpu_allow_cpu: bool = typer.Option(False, "--edgetpu-allow-cpu",
                                           help="With --edgetpu: accept ops that fall back to "
                                                "the CPU (a warning names them)."),
    debug: bool = typer.Option(False, help="Report the layers with the worst quantization "
                                           "error."),
    keep_float: Optional[List[str]] = typer.Option(None, metavar="NAME",
                                                   help="Leave in float: a tensor name from "
                                                        "--debug, or an op type like MEAN "
                                                        "(repeatable).", show_default="none"),
    name: Optional[str] = typer.Option(None, help="File stem.", show_default="the run's name"),
    seed: int = typer.Option(0, help="Seed of the calibration sample."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the accuracy check."),
    overwrite: bool = typer.Option(False, help="Replace existing exports."),
    unsafe: bool = typer.Option(False, help="Allow Lambda layers / custom code in the run's "
                                            "model files (only for runs you trust)."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
    compare_ptq: bool = typer.Option(False, "--compare-ptq",
                                     help="QAT run with --int8: also write NAME_int8_ptq.tflite "
                                          "(post-training int8 of the float model before QAT) "
                                          "and say which of the two to ship."),
    auto: bool = typer.Option(False, "--auto", help="With --int8: when the drop misses "
                              "--max-drop, search float layers / int16x8 (Edge TPU: integer "
                              "only) until one meets it; report every candidate."),
    auto_max_candidates: int = typer.Option(8, "--auto-max-candidates",
                                            help="Most models --auto converts and measures."),
    check_calibration: bool = typer.Option(False, "--check-calibration",
                                           help="Calibrate twice on disjoint halves; warn when "
                                                "the calibration set is too small."),
    plots: bool = typer.Option(False, "--plots", help="With --auto: a Pareto PNG (needs "
                                                      "matplotlib; else JSON and a table)."),
    quiet: bool = typer.Option(False, help="No progress output (the reports still print)."),
) -> None:
    """Convert a run to TFLite, then prove it: integer-only ops and accuracy parity."""
    from edgetl.config import ExportConfig
    from edgetl.errors import VerificationError

    modes = tuple(m for m, on in ((Quantization.int8, int8), (Quantization.float32, float32),
                                  (Quantization.float16, float16),
                                  (Quantization.dynamic, dynamic),
                                  (Quantization.int16x8, int16x8)) if on)
    cfg = ExportConfig(run=str(run), modes=modes or (Quantization.int8,), io=io,
                       num_calibration=num_calibration,
                       calibration=str(calibration) if calibration else None,
                       calibration_manifest=str(calibration_manifest)
                       if calibration_manifest else None,
                       max_drop=max_drop, edgetpu=edgetpu, debug=debug,
                       keep_float=tuple(keep_float or ()), name=name, seed=seed,
                       overwrite=overwrite, verify=not no_verify, unsafe=unsafe,
                       edgetpu_allow_cpu=edgetpu_allow_cpu, compare_ptq=compare_ptq,
                       auto=auto, auto_max_candidates=auto_max_candidates,
                       check_calibration=check_calibration, plots=plots)
    from edgetl.export import export as run_export, format_report
    from edgetl.progress import Progress

    shown = []  # modes whose block is printed: each as soon as it is verified

    def show(path, mode, report):
        if not as_json:
            typer.echo(format_report(path, mode, report))
            shown.append(mode)

    # SIGTERM ends an export like Ctrl-C: its clean-up runs and nothing is left half-written.
    from edgetl.export import interrupt_on_signal

    try:
        previous = {sig: signal.signal(sig, interrupt_on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (an embedding app): leave signals alone
        previous = None
    try:
        result = run_export(cfg, Progress(quiet=quiet, hold=True), show)
    except VerificationError as e:  # written but failed: show the figures, then the reason
        result = getattr(e, "result", None)
        if result is not None:
            tail = json.dumps(result.reports, indent=2) if as_json else \
                _export_tail(result, shown)
            if tail:
                typer.echo(tail)
        _fail(str(e), e.exit_code)
    except (Exception, KeyboardInterrupt) as e:
        if shown and isinstance(e, (EdgetlError, KeyboardInterrupt)):
            # The blocks above name files that the roll-back has just removed.
            text = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            _fail(f"{text} (no file was written, not even those above: an export keeps all its "
                  "files or none)", getattr(e, "exit_code", 130 if isinstance(
                      e, KeyboardInterrupt) else 2))
        _guard(_reraise, e)
    finally:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)
    if as_json:
        typer.echo(json.dumps(result.reports, indent=2))
    else:
        from edgetl.metadata import IO_ADVICE

        tail = _export_tail(result, shown)
        if tail:
            typer.echo(tail)
        typer.echo(IO_ADVICE)


def _export_tail(result, shown: list) -> str:
    """What export prints after the blocks already shown: any block not shown, the manifest."""
    from edgetl.export import format_report

    lines = [format_report(path, mode, r) for path, (mode, r)
             in zip(result.files, result.reports.items()) if mode not in shown]
    if result.manifest:
        lines.append(f"calibration manifest: {result.manifest}")
    return "\n".join(lines)


@app.command(short_help="Ops, dtypes, quantization, size, metadata, Edge TPU check.",
             epilog=_examples("edgetl inspect runs/flowers/export/flowers_int8.tflite",
                              "edgetl inspect model.tflite --json --no-compiler"))
def inspect(
    model: Path = typer.Argument(..., metavar="MODEL",
                                 help="A .tflite file (edgetl's or anyone's)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    no_compiler: bool = typer.Option(False, "--no-compiler",
                                     help="Do not run edgetpu_compiler even if installed."),
) -> None:
    """Ops, dtypes, I/O quantization, size, metadata and Edge TPU compatibility of a model."""
    from edgetl.inspect import format_inspect, inspect_model

    report = _guard(inspect_model, model, compiler=not no_compiler)
    typer.echo(json.dumps(report, indent=2) if as_json else format_inspect(report))


@app.command(short_help="Compare models through the device runner: size, accuracy, speed.",
             epilog=_examples("edgetl bench runs/flowers/export/*.tflite --data val/",
                              "edgetl bench model.tflite --threads 4 --json bench.json",
                              "edgetl bench model_edgetpu.tflite --delegate edgetpu"))
def bench(
    models: List[Path] = typer.Argument(..., metavar="MODEL",
                                       help="One or more .tflite files to compare."),
    data: Optional[Path] = typer.Option(None, help="Labelled folder for accuracy.",
                                        show_default="none: latency only"),
    labels: Optional[Path] = typer.Option(None, help="Labels file for models without "
                                                     "metadata.",
                                          show_default="the model's metadata"),
    runs: int = typer.Option(200, help="Timed runs per model."),
    warmup: int = typer.Option(20, help="Untimed runs first."),
    threads: Optional[int] = typer.Option(None, help="Interpreter threads.",
                                          show_default="the interpreter's"),
    delegate: str = typer.Option("xnnpack", metavar="<xnnpack|edgetpu|none>",
                                 help="xnnpack: the CPU's fast path; edgetpu: Coral; none: "
                                      "built-in kernels."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON.",
                                            show_default="none"),
    markdown: Optional[Path] = typer.Option(None, help="Write a Markdown table.",
                                            show_default="none"),
    plots: Optional[Path] = typer.Option(None, help="Write PNG plots here (matplotlib).",
                                         show_default="none"),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean for models without "
                                                  "metadata: 127.5 or 123.7,116.3,103.5.",
                                       show_default="the model's metadata"),
    std: Optional[str] = typer.Option(None, help="Per-channel std (1 or 3 values, as --mean).",
                                      show_default="the model's metadata"),
    raw: bool = typer.Option(False, help="Feed pixels unchanged in the model's input dtype."),
    bgr: bool = typer.Option(False, help="The models want BGR channel order."),
) -> None:
    """Run each model through the device runner; one comparison table (size, accuracy, latency)."""
    from edgetl import bench as b
    from edgetl.progress import Progress

    # before the models run, not after
    _check_outputs([(json_out, "--json"), (markdown, "--markdown")], [*models, labels],
                   [(data, "--data")], plots=plots)
    rows = _guard(b.bench, [str(m) for m in models], data=str(data) if data else None,
                  runs=runs, warmup=warmup, threads=threads, delegate=delegate,
                  labels=str(labels) if labels else None,
                  mean=_guard(b.parse_values, mean, "--mean"),
                  std=_guard(b.parse_values, std, "--std"), raw=raw, bgr=bgr,
                  progress=Progress())
    typer.echo(b.format_table(rows))
    if json_out:
        _guard(b.write_json, rows, json_out)
    if markdown:
        _guard(b.write_markdown, rows, markdown)
    if plots:
        for p in _guard(b.plot, rows, plots):
            typer.echo(f"plot: {p}")
    failed = [r for r in rows if r.get("error")]
    if failed:
        _fail(f"{len(failed)} model(s) could not run: {failed[0]['name']}: {failed[0]['error']}",
              1)


@app.command(short_help="Classify images through the device runner: top labels, scores.",
             epilog=_examples("edgetl predict model.tflite rose.jpg tulip.jpg",
                              "edgetl predict model.tflite photos/ --top 1 --json out.json"))
def predict(
    model: Path = typer.Argument(..., metavar="MODEL", help="A .tflite classifier."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE",
                                        help="Image files, or folders of images (one level "
                                             "deep), to classify."),
    top: int = typer.Option(5, help="Labels shown per image."),
    labels: Optional[Path] = typer.Option(None, help="Labels file for models without "
                                                     "metadata.",
                                          show_default="the model's metadata"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the predictions as JSON.",
                                            show_default="none"),
) -> None:
    """Classify images through the device runner: the --top labels of each, with scores.

    A folder gives its images one level deep (sub-folders are not searched). Files that cannot
    be classified are skipped and listed; exit 2 only when none could be.
    """
    from edgetl import runner as r

    _check_outputs([(json_out, "--json")], [model, labels, *images],
                   [(i, "IMAGE") for i in images if i.is_dir()])  # a folder's files are read
    args = [str(model), "--image", *map(str, images), "--top", str(top)]
    report = _guard(r.run, args + (["--labels", str(labels)] if labels else []))
    typer.echo(r.format_predictions(report["predictions"]))
    for note in report["notes"]:
        typer.echo(f"note: {r.printable(note)}", err=True)
    skipped = [p for p in report["predictions"] if p.get("error")]
    if skipped:
        typer.echo(f"note: {len(skipped)} of {len(report['predictions'])} file(s) skipped "
                   f"(first: {r.printable(skipped[0]['error'])})", err=True)
    if json_out:
        _guard(r.write_json, str(json_out), r.finite(report["predictions"]))


@app.command(short_help="Runner, model and run script, ready to copy to a device.",
             epilog=_examples("edgetl bundle model.tflite --out flowers-pi.tar.gz",
                              "edgetl bundle model.tflite --out pi/ --overwrite"))
def bundle(
    model: Path = typer.Argument(..., metavar="MODEL", help="The .tflite to ship."),
    out: Path = typer.Option(..., help="Folder, or a .tar.gz, to create."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
) -> None:
    """Runner + model + metadata + requirements + run script, ready to copy to a device."""
    from edgetl.bundle import bundle as make_bundle

    path = _guard(make_bundle, model, out, overwrite)
    typer.echo(f"bundle: {path}  (on the device: ./run.sh [--data DIR])")


@data_app.command("synth", epilog=_examples(
    "edgetl data synth shapes/",
    "edgetl data synth shapes/ --classes 6 --per-class 200 --size 96 --seed 1"))
def data_synth(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    classes: int = typer.Option(4, help="Classes, 2..6: circle, cross, square, triangle, ring, "
                                        "stripes (in this order)."),
    per_class: int = typer.Option(60, help="Images per class."),
    size: int = typer.Option(64, help="Image size in px (square)."),
    seed: int = typer.Option(0, help="Same seed, same images."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT."),
) -> None:
    """Write a deterministic generated shapes dataset (no download)."""
    from edgetl.data import make_synth

    counts = _guard(make_synth, out, classes, per_class, size, seed, overwrite)
    typer.echo(f"{out}: {sum(counts.values())} images in {len(counts)} classes "
               f"({', '.join(counts)})")


@data_app.command("idx", epilog=_examples(
    "edgetl data idx train-images.idx3.gz train-labels.idx1.gz fashion/",
    "edgetl data idx images.gz labels.gz digits/ --names mnist --limit 500"))
def data_idx(
    images: Path = typer.Argument(..., metavar="IMAGES", help="IDX images file (.gz ok)."),
    labels: Path = typer.Argument(..., metavar="LABELS", help="IDX labels file (.gz ok)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to create."),
    names: str = typer.Option("fashion-mnist", metavar="<fashion-mnist|mnist|FILE>",
                              help="Class names: built-in, or a file with one name a line."),
    limit: Optional[int] = typer.Option(None, help="At most this many images per class (the "
                                                   "first in file order).",
                                        show_default="every image"),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT."),
) -> None:
    """Convert MNIST / Fashion-MNIST IDX files to class folders of PNGs."""
    from edgetl.data import idx_to_folders

    if limit is not None and limit < 1:
        _fail(f"--limit {limit} must be at least 1")
    counts = _guard(idx_to_folders, str(images), str(labels), out, names, limit, overwrite)
    typer.echo(f"{out}: {sum(counts.values())} images in {len(counts)} classes")


fleet_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                        help="Benchmark on many devices over SSH (an inventory file of hosts).",
                        short_help="Benchmark on many devices over SSH.",
                        epilog=_examples("edgetl fleet check --hosts fleet.toml",
                                         "edgetl fleet bench model.tflite --hosts fleet.toml"))
app.add_typer(fleet_app, name="fleet")
_HOSTS = typer.Option(..., "--hosts", help="Inventory file (TOML): [defaults], [hosts.NAME].")
_ONLY = typer.Option(None, "--only", metavar="NAME", show_default="every host",
                     help="Only hosts with this name or label (repeatable).")


def _fleet_hosts(hosts: Path, only: Optional[List[str]]):
    from edgetl import fleet as f

    return _guard(f.select, _guard(f.load_inventory, hosts), only)


def _fleet_report(rows, columns, json_out, markdown, what: str) -> None:
    from edgetl import fleet as f

    typer.echo(f.format_table(rows, columns))
    if json_out:
        _guard(f.write_json, rows, json_out, columns)
    if markdown:
        _guard(f.write_markdown, rows, markdown, columns)
    bad = f.failed(rows)
    if bad:  # exit 1: some host or model failed (its row says why); 2 is kept for bad input
        _fail(f"{len(bad)} of {len(rows)} {what} failed: {bad[0]['host']}: {bad[0]['error']}", 1)


@fleet_app.command("bench", short_help="Run models on every host through the runner: one table.",
                   epilog=_examples(
    "edgetl fleet bench model.tflite --hosts fleet.toml --data photos/",
    "edgetl fleet bench a.tflite b.tflite --hosts fleet.toml --only pi4"))
def fleet_bench(
    models: List[Path] = typer.Argument(..., metavar="MODEL",
                                       help="One or more .tflite files."),
    hosts: Path = _HOSTS,
    data: Optional[Path] = typer.Option(None, help="Labelled folder for accuracy (copied).",
                                        show_default="none: latency only"),
    labels: Optional[Path] = typer.Option(None, help="Labels file for models without "
                                                     "metadata.",
                                          show_default="the model's metadata"),
    runs: int = typer.Option(200, help="Timed runs per model."),
    warmup: int = typer.Option(20, help="Untimed runs first."),
    threads: Optional[int] = typer.Option(None, help="Interpreter threads.",
                                          show_default="the interpreter's"),
    only: Optional[List[str]] = _ONLY,
    jobs: int = typer.Option(8, help="Hosts worked on at the same time."),
    timeout: float = typer.Option(900.0, help="Seconds per host, all models included."),
    keep: bool = typer.Option(False, help="Leave the remote run folders in place."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON.",
                                            show_default="none"),
    markdown: Optional[Path] = typer.Option(None, help="Write a Markdown table.",
                                            show_default="none"),
) -> None:
    """Run each model on every host through the device runner; one table. Exit 1 if any failed."""
    from edgetl import fleet as f

    _check_outputs([(json_out, "--json"), (markdown, "--markdown")], [hosts, *models, labels],
                   [(data, "--data")])
    selected = _fleet_hosts(hosts, only)
    job = f.Job(models=tuple(str(m) for m in models), data=str(data) if data else None,
                labels=str(labels) if labels else None, runs=runs, warmup=warmup,
                threads=threads, timeout=timeout, jobs=jobs, keep=keep)
    rows = _guard(f.bench, selected, job)
    _fleet_report(rows, f.BENCH_COLUMNS, json_out, markdown, "rows")


@fleet_app.command("check", short_help="Reachability and environment of each host.",
                   epilog=_examples("edgetl fleet check --hosts fleet.toml",
                                             "edgetl fleet check --hosts fleet.toml --only pi5"))
def fleet_check(
    hosts: Path = _HOSTS,
    only: Optional[List[str]] = _ONLY,
    jobs: int = typer.Option(8, help="Hosts checked at the same time."),
    timeout: float = typer.Option(60.0, help="Seconds per host."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the rows as JSON.",
                                            show_default="none"),
) -> None:
    """Reachability and environment of each host (arch, OS, Python, interpreter, libedgetpu)."""
    from edgetl import fleet as f

    _check_outputs([(json_out, "--json")], [hosts])
    rows = _guard(f.check, _fleet_hosts(hosts, only), timeout, jobs)
    _fleet_report(rows, f.CHECK_COLUMNS, json_out, None, "hosts")


@fleet_app.command("setup", short_help="Set up the hosts that are not ready (idempotent).",
                   epilog=_examples("edgetl fleet setup --hosts fleet.toml"))
def fleet_setup(
    hosts: Path = _HOSTS,
    only: Optional[List[str]] = _ONLY,
    jobs: int = typer.Option(8, help="Hosts set up at the same time."),
    timeout: float = typer.Option(1800.0, help="Seconds per host."),
) -> None:
    """Run the device set-up script on each host that is not ready yet (idempotent)."""
    from edgetl import fleet as f

    rows = _guard(f.setup, _fleet_hosts(hosts, only), timeout, jobs)
    _fleet_report(rows, f.SETUP_COLUMNS, None, None, "hosts")


@app.command(short_help="Rank tensors by the error int8 quantization adds.",
             epilog=_examples("edgetl sensitivity runs/flowers",
                              "edgetl sensitivity runs/flowers --top 10 --json sens.json"))
def sensitivity(
    run: Path = typer.Argument(..., metavar="RUN", help="Training run directory."),
    num_images: int = typer.Option(50, help="Validation images to compare on (never the "
                                            "calibration images)."),
    num_calibration: int = typer.Option(200, help="Calibration images, as export --int8."),
    top: int = typer.Option(20, help="Rows of the text table (the JSON has all)."),
    seed: int = typer.Option(0, help="Seed of the calibration and validation samples."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report "
                                                                "here.", show_default="none"),
    unsafe: bool = typer.Option(False, help="Allow Lambda layers / custom code in the run's "
                                            "model file (only for runs you trust)."),
) -> None:
    """Rank the model's tensors by the error int8 quantization adds (float32 vs int8 TFLite)."""
    from edgetl.sensitivity import SensitivityConfig, format_report, sensitivity as measure

    if top < 1:
        _fail(f"--top {top} must be at least 1")
    if json_out:  # the run's own files (config.json, model.keras, ...) are inputs
        _check_outputs([(json_out, "--json")], [p for p in Path(run).glob("*") if p.is_file()]
                       + [p for p in Path(run).glob("export/*") if p.is_file()])
    cfg = SensitivityConfig(run=str(run), num_images=num_images,
                            num_calibration=num_calibration, seed=seed, unsafe=unsafe)
    from edgetl.progress import Progress

    report = _guard(measure, cfg, Progress(hold=True))  # bad input stays one line in a log
    if json_out:
        from edgetl.sensitivity import write_json

        _guard(write_json, report, str(json_out))
    typer.echo(format_report(report, top))


for _typer_app in (app, data_app, fleet_app):  # typer has no app-wide command class
    for _info in _typer_app.registered_commands:
        if _info.cls in (None, typer.core.TyperCommand):
            _info.cls = _Command


def main() -> None:  # pragma: no cover - console entry point
    from edgetl.runner import filtered_native_stderr

    with filtered_native_stderr():  # the converter's and LiteRT's C++ chatter
        app()


if __name__ == "__main__":  # pragma: no cover
    main()
