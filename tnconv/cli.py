"""The ``tnconv`` command: list, compress, summary, calibrate, study, analyze, demo, admm,
cifar, reduction.

Every failure a user can cause (a missing file, a bad argument, a rank that does not fit) ends
with one line on stderr, ``tnconv: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as tdist
from .compress import compress
from .errors import TnconvError
from .io import load, save
from .rank import parse_rank_spec
from .registry import available, get
from .study import study
from .summary import summary

__all__ = ["main"]


class CLIError(Exception):
    """A user error reported as one line."""


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CLIError(f"{what} must be comma-separated integers, got {text!r}") from None
    return values


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _rank(text: str) -> int | float | tuple[int, ...]:
    if "," in text:
        return _ints(text, "--rank")
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)  # a float rank in (0, 1) is a ratio; the library validates it
        except ValueError:
            raise CLIError(
                f"--rank must be an int, a tuple like 4,8,8,4 or a float, got {text!r}"
            ) from None


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--option takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_model(path: str, args: argparse.Namespace | None = None) -> nn.Module:
    """The model in ``path``: a tnconv save, a state dict (with ``--model``), or -- only with
    ``--trust-file`` -- a pickled whole model (``torch.save(model)``). Nothing the file carries
    is unpickled without ``--trust-file``."""
    from .io import _is_safetensors

    model_fn = getattr(args, "model", None)
    trusted = bool(getattr(args, "trust_file", False))
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{path}: no such file")
    state: Any = None
    if _is_safetensors(file):
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                tnconv_file = "tnconv" in (f.metadata() or {})
                if not tnconv_file:
                    state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise CLIError(
                f"{path}: corrupt safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
        if tnconv_file:
            return load(file, model_fn=model_fn, trusted=trusted)
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # e.g. a pickled whole model: objects beyond tensors
            if not trusted:
                raise CLIError(
                    f"{path} is not a tnconv save nor a file of tensors ({type(exc).__name__}); "
                    "if it is a pickled model (torch.save(model)), opening it runs code the file "
                    "carries: pass --trust-file only if you trust it as you would a program, or "
                    "save its state_dict and pass --model module:function"
                ) from exc
            try:
                obj = torch.load(file, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise CLIError(
                    f"{path}: cannot read a model ({type(exc2).__name__}: {exc2})"
                ) from exc2
            if not isinstance(obj, nn.Module):
                raise CLIError(
                    f"{path} holds a {type(obj).__name__}, not a torch.nn.Module"
                ) from None
            return obj
        if isinstance(state, dict) and "tnconv" in state:
            return load(file, model_fn=model_fn, trusted=trusted)
    if not isinstance(state, dict):
        raise CLIError(f"{path} holds a {type(state).__name__}, not a model")
    if model_fn is None:
        raise CLIError(
            f"{path} holds a state_dict, not a model: pass --model module:function (a function "
            "building the architecture), or save the model with tnconv.save(model, path)"
        )
    from .io import _factory

    model = _factory(model_fn)()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise CLIError(f"{path}: the weights do not fit --model {model_fn}: {exc}") from exc
    return model


def _add_input_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="a function building the dense architecture (called without arguments) to load "
        "the file's weights into; importing MODULE runs its code",
    )
    p.add_argument(
        "--trust-file",
        action="store_true",
        help="allow unpickling Python objects from the input file (a pickled model, or the "
        "architecture in a tnconv save): THIS RUNS ARBITRARY CODE THE FILE CARRIES",
    )


def _read_kernels(path: str) -> dict[str, Any]:
    import numpy as np

    with np.load(path) as z:
        kernels = {k: z[k] for k in z.files if z[k].ndim == 4 and z[k].shape[1] > 1}
    if not kernels:
        raise CLIError(f"{path} has no 4-D kernels with more than one input channel")
    return kernels


# -- subcommands ------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    for name in available():
        dec = get(name)
        opts = ", ".join(dec.Options.model_fields) or "-"
        eps = "eps guaranteed" if dec.guarantees_eps else "eps searched"
        when = " [training-time: see `tnconv admm`]" if dec.training_time else ""
        print(f"{name:12s} ranks {dec.rank_order}; {eps}; options: {opts}{when}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    model = _read_model(args.input, args)
    spec: dict[str, Any] = {}
    if args.rank is not None:
        spec["rank"] = _rank(args.rank)
    if args.eps is not None:
        spec["eps"] = args.eps
    if args.ratio is not None:
        spec["ratio"] = args.ratio
    if args.budget is not None:
        spec["budget"] = (args.budget_kind, args.budget)
    if not spec:
        raise CLIError("give one of --rank, --eps, --ratio or --budget")
    parallel = _executor_args(args)
    if parallel and args.budget is None:
        raise CLIError("--workers / --scheduler run the candidate fits of --budget")
    size = _ints(args.input_size, "--input-size") if args.input_size else None
    layers = args.layers.split(",") if args.layers else None
    data: dict[str, Any] = {}
    if args.calibration:
        data["calibration"] = _calibration_batches(args.calibration)
        data["allocate_by"] = args.allocate_by
        data["sequential"] = args.sequential
    elif args.allocate_by != "kernel" or not args.sequential:
        raise CLIError("--allocate-by and --no-sequential apply with --calibration")
    small = compress(
        model,
        args.method,
        layers=layers,
        input_size=size,
        must_save=args.must_save,
        progress=not args.quiet,
        round_to=args.round_to,
        channels_last=args.channels_last,
        **spec,
        **parallel,
        **data,
        **_options(args.option),
    )
    save(small, args.output)
    print(summary(small, size))
    print(f"wrote {args.output}")
    return 0


CALIBRATION_BATCH = 64  # inputs per calibration batch read from a --calibration file


def _calibration_batches(path: str) -> list[torch.Tensor]:
    """The input tensor (N, C, H, W) in ``path`` (``.npy``, ``.safetensors`` with one tensor or
    one named "inputs", or a ``torch.save`` file read with ``weights_only=True``), cut into
    batches of :data:`CALIBRATION_BATCH`. Nothing is unpickled."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--calibration: no file {path}")
    try:
        if file.suffix == ".npy":
            x = torch.from_numpy(np.load(file, allow_pickle=False))
        elif file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(file))
            if "inputs" in tensors:
                x = tensors["inputs"]
            elif len(tensors) == 1:
                x = next(iter(tensors.values()))
            else:
                raise CLIError(
                    f"--calibration: {path} holds {sorted(tensors)}; name the inputs 'inputs'"
                )
        else:
            x = torch.load(file, weights_only=True, map_location="cpu")
    except CLIError:
        raise
    except Exception as exc:  # unreadable: say which file and why
        raise CLIError(f"--calibration: cannot read {path}: {exc}") from exc
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        what = (
            f"a {x.dtype} tensor of shape {tuple(x.shape)}"
            if isinstance(x, torch.Tensor)
            else type(x).__name__
        )
        raise CLIError(
            f"--calibration needs a float tensor of inputs (N, C, H, W); {path} holds {what}"
        )
    return list(x.split(CALIBRATION_BATCH))


def _executor_args(args: argparse.Namespace) -> dict[str, Any]:
    """``executor=`` / ``workers=`` from ``--scheduler`` / ``--workers`` (none for one worker)."""
    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    if args.scheduler and args.workers is not None:
        raise CLIError("--scheduler and --workers exclude each other (the cluster has its workers)")
    if args.scheduler:
        return {"executor": args.scheduler}
    if args.workers is not None and args.workers > 1:
        return {"executor": "processes", "workers": args.workers}
    return {}


def cmd_summary(args: argparse.Namespace) -> int:
    model = _read_model(args.input, args)
    size = _ints(args.input_size, "--input-size") if args.input_size else None
    s = summary(model, size, latency=args.latency, channels_last=args.channels_last)
    print(s)
    if args.csv:
        s.to_csv(args.csv)
        print(f"wrote {args.csv}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibration

    if args.reset:
        removed = calibration.reset()
        print(f"removed {removed[0]}" if removed else "no cached calibration to remove")
    if args.show:
        path = calibration.cache_file()
        entries = calibration.cached()
        print(f"{path}: {len(entries)} table(s)")
        for key, table in sorted(entries.items()):
            print(f"{key}\n  {json.dumps(table)}")
        return 0
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    tables = calibration.calibrate(args.threads)
    for layout, table in tables.items():
        print(f"{layout} ({table.threads} threads): {table}")
    print(f"cached in {calibration.cache_file()}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    methods = args.methods.split(",") if args.methods else None
    budgets = _floats(args.budgets, "--budgets")
    size = _ints(args.input_size, "--input-size") if args.input_size else None
    source = args.input
    target: Any
    if source.endswith(".npz"):
        if not Path(source).is_file():
            raise CLIError(f"{source}: no such file")
        target = _read_kernels(source)
    else:
        target = _read_model(source, args)
    parallel = _executor_args(args)
    if parallel and source.endswith(".npz"):
        raise CLIError("--workers / --scheduler run model studies; kernel studies run here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and not source.endswith(".npz"):
        parallel["resume"] = out / "study.csv"
    result = study(
        target,
        methods,
        budgets,
        input_size=size,
        progress=not args.quiet,
        latency_repeats=args.repeats,
        **parallel,
    )
    print(result)
    result.to_csv(out / "study.csv")
    written = [out / "study.csv"]
    try:
        written.append(result.plot(out / "study.png"))
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(budget=args.budget, progress=not args.quiet, source=args.source)
    if args.methods:
        config.methods = args.methods.split(",")
    if args.quick:
        config.epochs, config.source, config.width = 2, "sklearn", 16
    result = run_demo(args.out, config)
    print(result)
    out = Path(args.out)
    print(f"wrote {out / 'results.csv'}, {out / 'results.png'}, {out / 'results.json'}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from . import analysis

    model = _read_model(args.input, args)
    convs = [(n, m) for n, m in analysis.conv2d_layers(model, None) if m.groups == 1]
    if args.layers:
        wanted = args.layers.split(",")
        known = {n for n, _ in convs}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise CLIError(f"--layers: no ungrouped conv named {', '.join(unknown)}")
        convs = [(n, m) for n, m in convs if n in wanted]
    if not convs:
        raise CLIError(f"{args.input} has no ungrouped nn.Conv2d to analyze")
    names = [n for n, _ in convs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = analysis.layer_table(model, names, progress=not args.quiet)
    written = [analysis.write_csv(rows, out / "cuts.csv")]
    if args.plot_layers:
        plot_names = args.plot_layers.split(",")
        unknown = [n for n in plot_names if n not in names]
        if unknown:
            raise CLIError(f"--plot-layers: {', '.join(unknown)} not among the analyzed layers")
    else:
        plot_names = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))
    weights = dict(convs)
    try:
        written.append(
            analysis.plot_spectra(
                {n: weights[n].weight for n in plot_names}, out / "spectra.png", args.input
            )
        )
        written.append(analysis.plot_entropy(rows, out / "entropy.png", args.input))
    except ImportError as exc:
        print(f"no plots: {exc}", file=sys.stderr)
    if args.data:
        written += _analyze_sweep(model, names, args, out)
    print(f"{len(names)} layers x {len(analysis.CUTS)} cuts")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _analyze_sweep(
    model: nn.Module, names: list[str], args: argparse.Namespace, out: Path
) -> list[Path]:
    """Truncation sweep on the shipped digits' test split (accuracy against norm loss)."""
    from torch.utils.data import DataLoader

    from . import analysis
    from .datasets import digits
    from .training import evaluate, fit

    train, test = digits(args.data, seed=0)
    test_loader = DataLoader(test, batch_size=256)
    try:
        model.eval()
        with torch.no_grad():
            model(test.tensors[0][:2])
    except Exception as exc:
        raise CLIError(
            f"the model cannot run on the {args.data} digits (images "
            f"{tuple(test.tensors[0].shape[1:])}): {type(exc).__name__}: {exc}"
        ) from exc
    retrain = None
    if args.retrain_epochs:
        gen = torch.Generator().manual_seed(0)
        loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)

        def retrain(m: nn.Module) -> None:
            fit(m, loader, args.retrain_epochs, lr=0.005, progress=not args.quiet)

    cuts = [c.strip().replace(":", ",") for c in args.cuts.split(",")]
    result = analysis.sweep(
        model,
        lambda m: evaluate(m, test_loader),
        cuts,
        list(_floats(args.keeps, "--keeps")),
        retrain,
        layers=names,
        progress=not args.quiet,
    )
    print(result)
    written = [result.to_csv(out / "sweep.csv")]
    try:
        written.append(
            analysis.plot_sweep(result, out / "sweep.png", f"{args.input} on {args.data} digits")
        )
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    return written


def cmd_admm(args: argparse.Namespace) -> int:
    """ADMM training toward a method on the shipped digits, compression, fine-tuning.

    Under ``torchrun`` every training loop runs data-parallel over the same global batches
    (:mod:`tnconv.distributed`); rank 0 alone prints and writes the model.
    """
    started = tdist.init_from_env()
    try:
        return _admm(args)
    finally:
        if started:
            tdist.barrier()
            torch.distributed.destroy_process_group()


def _say(*lines: str) -> None:
    """Print on rank 0 (every line, in a process without a group)."""
    if tdist.is_main_process():
        print(*lines, sep="\n")


def _admm(args: argparse.Namespace) -> int:
    import copy

    from .admm import ADMM, ADMMSchedule
    from .experiments.admm import (
        ADMMRun,
        admm_arm,
        default_layers,
        direct_arm,
        layer_params,
        load_digits,
        train_dense,
    )
    from .training import evaluate

    spec: dict[str, Any] = {}
    if args.rank is not None:
        spec["rank"] = _rank(args.rank)
    if args.eps is not None:
        spec["eps"] = args.eps
    if args.ratio is not None:
        spec["ratio"] = args.ratio
    if args.budget is not None:
        spec["budget"] = (args.budget_kind, args.budget)
    if not spec:
        raise CLIError("give one of --rank, --eps, --ratio or --budget")
    for flag, value in (("--epochs", args.epochs), ("--tune-epochs", args.tune_epochs)):
        if value < (1 if flag == "--epochs" else 0):
            raise CLIError(f"{flag} must be >= {1 if flag == '--epochs' else 0}; got {value}")
    # everything that can be checked without a model fails before any training
    ADMMSchedule.given(args.rho, args.rho_growth, args.rho_max)
    method = get(args.method).name
    base = getattr(get(method), "base_name", "") or method  # admm-<base> means <base>
    get(base).parse_options(_options(args.option))
    if "budget" not in spec:
        parse_rank_spec(spec.get("rank"), spec.get("eps"), spec.get("ratio"))
    if args.batch_size < 1 or (args.train_limit is not None and args.train_limit < 1):
        raise CLIError("--batch-size and --train-limit must be >= 1")
    torch.manual_seed(args.seed)
    data = load_digits(args.source, seed=args.seed, limit=args.train_limit)
    progress = not args.quiet
    if args.input:
        model = _read_model(args.input, args)
    else:
        model = train_dense(
            data,
            width=args.width,
            epochs=args.dense_epochs,
            seed=args.seed,
            progress=progress,
            sync_batchnorm=args.sync_batchnorm,
        )
    try:
        dense_acc = evaluate(model, data.test_loader())
    except Exception as exc:
        raise CLIError(
            f"the model cannot classify the {args.source} digits (images {data.image}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    layers: Any = args.layers.split(",") if args.layers else default_layers
    run = ADMMRun(
        admm_epochs=args.epochs,
        tune_epochs=args.tune_epochs,
        rho=args.rho,
        rho_growth=args.rho_growth,
        rho_max=args.rho_max,
        admm_lr=args.lr,
        tune_lr=args.tune_lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress,
        sync_batchnorm=args.sync_batchnorm,
        options={base: _options(args.option)},
    )
    ADMM(
        copy.deepcopy(model),
        base,
        layers=layers,
        rho=args.rho,
        rho_growth=args.rho_growth,
        rho_max=args.rho_max,
        **spec,
        **run.options[base],
    )  # bad input fails before training
    arms = [("admm", admm_arm(model, base, data, run, layers, **spec), args.epochs)]
    if args.compare:
        arms.append(("direct", direct_arm(model, base, data, run, layers, **spec), 0))
    admm = arms[0][1].admm
    assert admm is not None
    for h in admm.history:
        _say(
            f"admm step {h['step']:3d}  rho {h['rho']:.3g}  max ||W-Z||/||W|| "
            f"{h['max_distance']:.4f}"
        )
    names = list(admm._layers)
    rows = [
        f"{'arm':7s} {'params (chosen convs)':>22s} {'before':>7s} {'tuned':>6s} "
        f"{'epochs':>13s} {'s':>5s}"
    ]
    dense_params = layer_params(model, names)[1]
    rows.append(f"{'dense':7s} {dense_params:>10d}->{dense_params:<11d} {100 * dense_acc:7.1f}")
    for label, arm, admm_epochs in arms:
        params = layer_params(arm.model, names)[0]
        tune = args.epochs + args.tune_epochs - admm_epochs
        epochs = f"{admm_epochs} admm+{tune} ft"
        rows.append(
            f"{label:7s} {dense_params:>10d}->{params:<11d} {100 * arm.before:7.1f} "
            f"{100 * arm.after:6.1f} {epochs:>13s} {arm.seconds:5.0f}"
        )
    _say(*rows, "(accuracy % on the test digits before / after fine-tuning)")
    if tdist.is_main_process():
        save(arms[0][1].model, args.output)
        _say(f"wrote {args.output}")
    tdist.barrier()  # the file exists for every rank afterwards
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Hand the remaining arguments to an experiment script's own ``main``."""
    if args.command == "cifar":
        from .experiments.cifar import main as run
    else:
        from .experiments.reduction import main as run
    return int(run(args.args))


# -- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tnconv", description="Compress CNNs with tensor-network decompositions.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("list", help="list the registered decompositions")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("compress", help="compress a saved model")
    p.add_argument("input", help="a tnconv.save file (or torch.save(model) with --trust-file)")
    p.add_argument("-m", "--method", required=True, help="a name from `tnconv list`")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--rank", help="int, tuple like 4,8,8,4, or a float ratio")
    spec.add_argument("--eps", type=float, help="relative error bound in (0, 1)")
    spec.add_argument("--ratio", type=float, help="share of each layer's parameters in (0, 1]")
    spec.add_argument("--budget", type=float, help="global share of the layers' params / FLOPs")
    p.add_argument("--budget-kind", choices=["params", "flops", "latency"], default="params")
    p.add_argument("--layers", help="comma-separated conv names (default: all convs)")
    p.add_argument("--input-size", help="B,C,H,W for FLOPs, e.g. 1,3,32,32")
    p.add_argument("--must-save", choices=["params", "flops", "both", "latency"], default="params")
    p.add_argument("--round-to", type=int, help="round ranks to multiples when measured faster")
    p.add_argument(
        "--channels-last", action="store_true", help="time layers on channels-last inputs"
    )
    p.add_argument("--option", action="append", default=[], help="method option key=value")
    p.add_argument(
        "--workers",
        type=int,
        help="with --budget: fit the layers' candidates on a local pool of N processes",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --budget: fit the layers' candidates on a Dask cluster, e.g. "
        "tcp://host:8786 (pip install 'tnconv[distributed]')",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="inputs (N,C,H,W) in a .npy / .safetensors / torch.save file: fit each layer's "
        "outputs on them (output-aware, BN folded, sequential refit; docs/data_aware.md)",
    )
    p.add_argument(
        "--allocate-by",
        choices=["kernel", "output", "logits"],
        default="kernel",
        help="with --calibration and --budget: price candidates by kernel, layer-output or "
        "model-output error",
    )
    p.add_argument(
        "--no-sequential",
        dest="sequential",
        action="store_false",
        help="with --calibration: fit each layer on the dense model's inputs only",
    )
    p.add_argument("-o", "--output", required=True, help="where to tnconv.save the result")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_input_trust(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("summary", help="per-layer parameters, FLOPs, ranks of a saved model")
    p.add_argument("input")
    p.add_argument("--input-size", help="B,C,H,W (default: as compressed, else 1,C,224,224)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--latency", action="store_true", help="time each layer against dense")
    p.add_argument("--channels-last", action="store_true", help="time on channels-last inputs")
    _add_input_trust(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("calibrate", help="measure this machine's cost tables for the planner")
    p.add_argument("--reset", action="store_true", help="delete the cached tables first")
    p.add_argument("--threads", type=int, help="thread count to calibrate (default: torch's)")
    p.add_argument("--show", action="store_true", help="print the cached tables, measure none")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("study", help="compare methods at matched budgets")
    p.add_argument("input", help="a saved model, or an .npz of kernels (T, S, kh, kw)")
    p.add_argument("--methods", help="comma-separated (default: all)")
    p.add_argument("--budgets", default="0.1,0.25,0.5", help="parameter shares")
    p.add_argument("--input-size", help="B,C,H,W for FLOPs and latency")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes (0: none)")
    p.add_argument("--out", required=True, help="folder for study.csv and study.png")
    p.add_argument(
        "--workers", type=int, help="run the cells on a local pool of N processes (model studies)"
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the cells on a Dask cluster, e.g. tcp://host:8786 (pip install "
        "'tnconv[distributed]')",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in OUT/study.csv and compute only the missing cells; "
        "rows are written there as they finish",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    _add_input_trust(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="train a digits CNN and compare every method on it")
    p.add_argument("--out", required=True, help="folder for results.csv / .png / .json")
    p.add_argument("--budget", type=float, default=0.25, help="share of the 3x3 convs' params")
    p.add_argument("--methods", help="comma-separated (default: all)")
    p.add_argument("--source", choices=["mnist", "sklearn"], default="mnist")
    p.add_argument("--quick", action="store_true", help="a one-minute version (8x8 digits)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "analyze", help="spectra, entropies and truncation sweeps of a model's dense kernels"
    )
    p.add_argument("input", help="a tnconv.save file (or torch.save(model) with --trust-file)")
    p.add_argument("--out", required=True, help="folder for cuts.csv, spectra.png, entropy.png")
    p.add_argument("--layers", help="comma-separated conv names (default: every ungrouped conv)")
    p.add_argument("--plot-layers", help="layers whose spectra are plotted (default: 3 by depth)")
    p.add_argument(
        "--data",
        choices=["mnist", "sklearn"],
        help="also sweep truncations on these shipped digits (sweep.csv, sweep.png)",
    )
    p.add_argument(
        "--cuts",
        default="OUT,IN,KH,KW,OUT:IN,OUT:KH,OUT:KW",
        help="for the sweep; two-mode cuts written OUT:IN; CP for a CP fit",
    )
    p.add_argument("--keeps", default="0.5,0.25,0.1", help="kept shares for the sweep")
    p.add_argument("--retrain-epochs", type=int, default=0, help="re-train each truncation")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_input_trust(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "admm",
        help="ADMM-train a digits model toward a method, compress, fine-tune (docs/admm.md)",
    )
    p.add_argument("input", nargs="?", help="a saved digits model (default: train a DigitsNet)")
    p.add_argument("-m", "--method", required=True, help="a name from `tnconv list`")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--rank", help="int, tuple like 4,8,8,4, or a float ratio")
    spec.add_argument("--eps", type=float, help="relative error bound in (0, 1)")
    spec.add_argument("--ratio", type=float, help="share of each layer's parameters in (0, 1]")
    spec.add_argument("--budget", type=float, help="global share, ranks fixed on the first step")
    p.add_argument("--budget-kind", choices=["params", "flops"], default="params")
    p.add_argument("--epochs", type=int, default=3, help="ADMM training epochs")
    p.add_argument("--tune-epochs", type=int, default=1, help="fine-tuning epochs after it")
    p.add_argument(
        "--rho",
        type=float,
        help="initial penalty weight (default: derived from --lr and the batches per epoch, "
        "a pull of 1.25 per epoch doubled every epoch; docs/admm.md)",
    )
    p.add_argument(
        "--rho-growth",
        type=float,
        help="rho *= this per ADMM step (default: x2 per epoch for a derived rho, 1 with --rho)",
    )
    p.add_argument(
        "--rho-max",
        type=float,
        help="cap on rho (default: 16x the derived start, at most 0.2/lr; none with --rho)",
    )
    p.add_argument("--lr", type=float, default=0.02, help="ADMM training peak lr (OneCycle)")
    p.add_argument("--tune-lr", type=float, default=0.005, help="fine-tuning peak lr")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--source", choices=["mnist", "sklearn"], default="mnist")
    p.add_argument("--train-limit", type=int, help="use at most this many training digits")
    p.add_argument("--width", type=int, default=32, help="DigitsNet width (no input model)")
    p.add_argument("--dense-epochs", type=int, default=6, help="DigitsNet training epochs")
    p.add_argument("--layers", help="comma-separated conv names (default: convs with >1 input)")
    p.add_argument("--compare", action="store_true", help="also run direct compression")
    p.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="under torchrun: batch-norm statistics over the global batch (the 1-process model)",
    )
    p.add_argument("--option", action="append", default=[], help="method option key=value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="where to tnconv.save the result")
    p.add_argument("-q", "--quiet", action="store_true")
    _add_input_trust(p)
    p.set_defaults(func=cmd_admm)

    for name, text in (
        ("cifar", "the RSDTR paper's CIFAR-10 protocol on a local folder (docs/cifar.md)"),
        ("reduction", "parameter / FLOP reductions per eps of a CIFAR model (docs/cifar.md)"),
    ):
        p = sub.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"see `tnconv {name} --help`")
        p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tnconv`` script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return int(args.func(args))
    except (CLIError, TnconvError, ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tnconv: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
