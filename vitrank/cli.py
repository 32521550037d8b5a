"""The `vitrank` command line: one subcommand per step of the pipeline.

Every subcommand is parsed here and handled by `_cmd_<name>(args) -> int`; heavy
imports happen inside the handlers, so `vitrank --help` stays fast. Errors caused by the
user's input print one or two lines (exit 2); anything else prints one line and exits 1;
`--verbose` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

USAGE_ERROR, FAILURE = 2, 1

SUBCOMMANDS: dict[str, str] = {
    "search": "search the Pareto front of compressed models under a budget (the main job)",
    "report": "write report.html, summary.md and trials tables for one or more runs",
    "apply": "apply a saved compression config to a model, re-calibrated on your data",
    "eval": "accuracy, parameters, FLOPs and latency of a saved compressed model",
    "finetune": "fine-tune more winners of a finished search by distillation",
    "export": "export a saved compressed model to ONNX",
    "latency": "measure the per-operator latency table on a device",
    "space": "show a teacher's blocks and shapes (what the search can change)",
}


# --- parsing ------------------------------------------------------------------------------


def _add_workload(parser: argparse.ArgumentParser, *, calib: bool = True) -> None:
    group = parser.add_argument_group("workload (teacher and images)")
    group.add_argument(
        "--workload",
        default=None,
        help="embedded workload (default: digits-vit, a small ViT on sklearn's digits)",
    )
    group.add_argument(
        "--model",
        default=None,
        help="a timm ViT name (e.g. deit_small_patch16_224) or local-dir:PATH (a timm folder)",
    )
    group.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="ImageFolder directory: DIR/train/<class>/, DIR/val/<class>/ or DIR/<class>/",
    )
    group.add_argument(
        "--pretrained",
        action="store_true",
        default=None,
        help="load the named model's hub weights (needs a network)",
    )
    if calib:
        group.add_argument(
            "--calib-size",
            type=int,
            default=None,
            metavar="N",
            help="calibration images drawn from the training split (default: 256)",
        )


def _add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, batch_help: str) -> None:
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cpu)", metavar="D"
    )
    parser.add_argument("--batch", type=int, default=None, metavar="B", help=batch_help)


def _add_ops(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops",
        default=None,
        help="operator families to search, comma separated: lowrank,heads,tokens,prune "
        "(default: all for FLOPs/latency budgets; lowrank,heads,prune for a params budget)",
    )
    parser.add_argument(
        "--granularity",
        type=int,
        default=None,
        metavar="G",
        help="ranks are multiples of G (default: 8)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitrank",
        description="Automatic compression of Vision Transformers: searches per-layer "
        "ranks, head-level factorization, token merging and channel pruning under a budget.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show full tracebacks")
    # also accepted after the subcommand; SUPPRESS keeps it from resetting the global flag
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=SUBCOMMANDS[name], description=SUBCOMMANDS[name], parents=[verbose]
        )

    p = command("search")
    _add_workload(p)
    p.add_argument("--config", default=None, metavar="YAML", help="settings file (run.yaml)")
    budget = p.add_argument_group("budget (default: --budget-params 0.5)")
    budget.add_argument(
        "--budget-params",
        default=None,
        metavar="P",
        help="parameters kept: a fraction of the teacher's (0.5) or a count (11M)",
    )
    budget.add_argument(
        "--budget-latency", type=float, default=None, metavar="MS", help="latency in ms"
    )
    budget.add_argument(
        "--budget-flops", type=float, default=None, metavar="F", help="FLOPs kept, a fraction"
    )
    _add_device(budget, "batch size the latency budget is measured at (default: 1)")
    p.add_argument(
        "--objectives",
        default=None,
        help="comma separated objectives (default: proxy,params; proxy,latency with a "
        "latency budget)",
    )
    _add_ops(p)
    p.add_argument("--proxy", choices=["logits", "spectral"], default=None, help="default: logits")
    p.add_argument(
        "--parametrization", choices=["raw", "budgeted"], default=None, help="default: raw"
    )
    p.add_argument("--svd", choices=["whitened", "plain"], default=None, help="default: whitened")
    p.add_argument("--trials", type=int, default=None, metavar="N", help="default: 40")
    p.add_argument(
        "--sampler",
        default=None,
        help="tpe, nsga2, gp, random or baseline:NAME (default: tpe)",
    )
    p.add_argument(
        "--refine",
        type=float,
        default=None,
        metavar="F",
        help="fraction of the trials that refine the best feasible trials by local moves "
        "(raw parametrization; default: 0.75, 0 turns it off)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: 0")
    p.add_argument("--engine", choices=["ray", "optuna"], default=None, help="default: ray")
    p.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="join an existing Ray cluster"
    )
    p.add_argument("--cpus-per-trial", type=float, default=None, metavar="N")
    p.add_argument("--gpus-per-trial", type=float, default=None, metavar="N")
    p.add_argument(
        "--finetune-top",
        type=int,
        default=None,
        metavar="K",
        help="winners fine-tuned after the search",
    )
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="E")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/…)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the search in --out where it stopped",
    )

    p = command("report")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="one run, or several to compare")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="where to write (default: the run directory)"
    )

    p = command("apply")
    p.add_argument("config", metavar="CONFIG", help="a config.json found by a search")
    _add_workload(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the model")
    p.add_argument("--seed", type=int, default=None, help="picks the calibration subset")

    p = command("eval")
    p.add_argument("model_dir", metavar="DIR", help="a saved compressed model")
    _add_workload(p, calib=False)
    _add_device(p, "batch size for accuracy and latency (default: 1 for latency)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("finetune")
    p.add_argument("run", metavar="RUN_DIR", help="a finished search's directory")
    p.add_argument("--top", type=int, default=None, metavar="K", help="winners to fine-tune")
    p.add_argument("--epochs", type=int, default=None, metavar="E")
    p.add_argument("--device", default=None, metavar="D")

    p = command("export")
    p.add_argument("model_dir", metavar="DIR", help="a saved compressed model")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")

    p = command("latency")
    _add_workload(p, calib=False)
    _add_device(p, "batch size (default: 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads pinned")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help="timed runs per op")
    p.add_argument("--out", default=None, metavar="FILE", help="where to save the table")

    p = command("space")
    _add_workload(p, calib=False)
    _add_ops(p)
    return parser


def _version() -> str:
    from vitrank import __version__

    return __version__


# --- handlers -----------------------------------------------------------------------------


def _not_built(name: str) -> int:
    print(f"vitrank {name} is not built yet.", file=sys.stderr)
    return USAGE_ERROR


def load_workload_from_args(args: argparse.Namespace) -> Any:
    """The `Workload` the shared workload options name."""
    from vitrank.workloads import load_workload

    kwargs: dict[str, Any] = {
        "workload": args.workload,
        "model": args.model,
        "data": args.data,
        "pretrained": bool(args.pretrained),
    }
    if getattr(args, "calib_size", None) is not None:
        kwargs["calib_size"] = args.calib_size
    if getattr(args, "seed", None) is not None:
        kwargs["seed"] = args.seed
    return load_workload(**kwargs)


def _cmd_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search import SearchSettings
    from vitrank.api import search

    known = set(SearchSettings.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    run_dir = Path(search(args.config, **given))
    winners = sorted(p for p in (run_dir / "winners").glob("*") if p.is_dir())
    print(f"run: {run_dir}")
    if (run_dir / "report.html").exists():
        print(f"report: {run_dir / 'report.html'}")
    for winner in winners:
        print(f"winner: {winner}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    import reports

    if len(args.runs) == 1:
        paths = reports.build(args.runs[0], out=args.out)
    else:
        names = "-vs-".join(Path(run).name for run in args.runs)
        out = Path(args.out) if args.out else Path(args.runs[0]).parent / f"compare-{names}"
        paths = reports.compare(args.runs, out)
    print(f"wrote {paths.html}\n      {paths.summary}\n      {paths.csv}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evaluators.calibration import calibrate
    from reports import recorded_workload
    from spaces import CompressionConfig
    from vitrank.api import compress, save
    from vitrank.compress.structure import inspect_vit

    path = Path(args.config)
    path = path / "config.json" if path.is_dir() else path  # a winner's folder is accepted
    if not path.is_file():
        raise FileNotFoundError(
            f"config {path} does not exist; pass a config.json a search saved "
            "(runs/<name>/winners/<id>/config.json)."
        )
    config = CompressionConfig.load(path)
    recorded = recorded_workload(config, path.parent)
    named = any(getattr(args, key) is not None for key in ("workload", "model", "data"))
    for key, value in recorded.items():
        # No teacher named: the one the config was found for. Calibration settings
        # default to the run's, so a winner's config rebuilds the winner exactly.
        if getattr(args, key, None) is None and (not named or key in ("calib_size", "seed")):
            setattr(args, key, value)
    workload = load_workload_from_args(args)
    fingerprint = inspect_vit(workload.model, config.fingerprint.architecture)
    if fingerprint != config.fingerprint:
        raise ValueError(
            f"{path} was found for {config.fingerprint.architecture}, which {workload.name} is "
            f"not ({config.fingerprint.describe_difference(fingerprint)}); pass --model with "
            "the architecture the config was made for."
        )
    stats = calibrate(workload.model, workload.calib, progress=sys.stderr.isatty())
    provenance = {
        **config.provenance,
        "applied_from": str(path),
        "workload": {
            "workload": args.workload,
            "model": args.model,
            "data": str(args.data) if args.data is not None else None,
            "pretrained": bool(args.pretrained),
            "calib_size": args.calib_size,
            "seed": args.seed,
        },
    }
    refine: dict[str, Any] = {}
    if config.compensate:
        from search._winners import COMPENSATION_STEPS

        # Error compensation as the search ran it for its winners, on the calibration images.
        refine = {"images": workload.calib, "compensation_steps": COMPENSATION_STEPS}
    model = compress(workload.model, config.replace(provenance=provenance), stats, **refine)
    out = save(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    teacher = sum(p.numel() for p in workload.model.parameters())
    print(
        f"saved {out}: {params:,} parameters, {params / teacher:.1%} of {workload.name}; "
        f"measure it with `vitrank eval {args.out}`."
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import timm
    from rich.console import Console
    from rich.table import Table
    from timm.data.model_config import resolve_input_data_config

    from evaluators import evaluate_accuracy, measure_latency
    from reports import recorded_workload
    from spaces import count_flops, dense_flops
    from vitrank.api import CONFIG_ATTRIBUTE, load

    directory = Path(args.model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no saved compressed model (config.json + model.safetensors); "
            "make one with `vitrank apply` or pass a search's runs/<name>/winners/<id>/."
        )
    model = load(directory)
    config = getattr(model, CONFIG_ATTRIBUTE)
    device, batch = args.device or "cpu", args.batch
    recorded = recorded_workload(config, directory)
    named = any(getattr(args, key) is not None for key in ("workload", "model", "data"))
    workload = None
    if not named:
        for key in ("workload", "model", "data", "pretrained"):
            if recorded.get(key) is not None:
                setattr(args, key, recorded[key])
    if named or recorded:
        workload = load_workload_from_args(args)
    # Latency does not depend on the weights: without a workload, time the bare architecture.
    teacher = workload.model if workload else timm.create_model(config.model, **config.model_args)
    input_size = tuple(resolve_input_data_config(model)["input_size"])
    rows: dict[str, dict[str, Any]] = {"compressed": {}, "teacher": {}}
    for name, module in (("compressed", model), ("teacher", teacher)):
        row = rows[name]
        row["params"] = sum(p.numel() for p in module.parameters())
        module.to(device).eval()  # accuracy runs where the model is
        if workload is not None:
            row["accuracy"] = evaluate_accuracy(
                module, workload.val, batch_size=batch or 256, device=device, progress=False
            )
        # As the search measures its winners (search/_winners.py), so the numbers compare.
        latency = measure_latency(
            module, input_size, batch=batch or 1, device=device, warmup=5, repeats=30
        )
        row["latency_ms"] = latency.median_ms
    rows["compressed"]["flops"] = count_flops(config, batch=1)
    rows["teacher"]["flops"] = dense_flops(config.fingerprint, batch=1)
    result = {
        "model_dir": str(directory),
        "model": config.model,
        "workload": workload.name if workload else None,
        "device": device,
        "latency_batch": batch or 1,
        **rows["compressed"],
        "teacher": rows["teacher"],
        "speedup": rows["teacher"]["latency_ms"] / rows["compressed"]["latency_ms"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"{directory} ({config.model}, {result['workload'] or 'no data given'})")
    for column in ("", "compressed", "teacher", "ratio"):
        table.add_column(column, justify="left" if not column else "right")
    for key, label, form in (
        ("accuracy", "accuracy", "{:.2%}"),
        ("params", "parameters", "{:,}"),
        ("flops", "FLOPs (batch 1)", "{:,}"),
        ("latency_ms", f"latency ms (batch {batch or 1}, {device})", "{:.3f}"),
    ):
        mine, theirs = rows["compressed"].get(key), rows["teacher"].get(key)
        if mine is None or theirs is None:
            continue
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        table.add_row(label, form.format(mine), form.format(theirs), ratio)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    note = "" if workload else "; give --workload/--model/--data to measure accuracy"
    console.print(f"speed-up {result['speedup']:.2f}x{note}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import pandas as pd

    import reports
    from search import RunDir, SearchSettings
    from search._problem import forget, problem
    from search._run import _load_workload
    from search._winners import save_winners

    run = RunDir(args.run)
    if not run.exists() or not run.trials.is_file():
        raise FileNotFoundError(
            f"{run.root} is not a finished search (run.yaml and trials.parquet are missing); "
            "pass the run directory a `vitrank search` wrote."
        )
    if args.top is not None and args.top < 1 or args.epochs is not None and args.epochs < 1:
        raise ValueError(
            f"`--top >= 1` and `--epochs >= 1` must hold, but got {args.top=}, {args.epochs=}."
        )
    settings = SearchSettings.load(run.settings)
    top = args.top or max(settings.finetune_top, 1)
    epochs = args.epochs or max(settings.finetune_epochs, 1)
    rows = pd.read_parquet(run.trials).to_dict("records")
    with run:  # the search's lock: never while a search writes this directory
        forget(run.root)
        current = problem(run.root)
        if args.device is not None:
            current.settings.device = args.device
        # The winners are chosen and built exactly as the search does (same front, same seed).
        save_winners(
            current,
            _load_workload(settings),
            rows,
            top=top,
            epochs=epochs,
            ray=settings.engine == "ray",
            log=lambda message: print(message, file=sys.stderr),
        )
    paths = reports.build(run.root)
    print(f"fine-tuned the top {top} winner(s) in {run.winners}; report: {paths.html}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    import torch
    from timm.data.model_config import resolve_input_data_config

    from vitrank.api import load

    directory, onnx_path = Path(args.model_dir), Path(args.onnx)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no saved compressed model (config.json + model.safetensors); "
            "make one with `vitrank apply` or pass a search's runs/<name>/winners/<id>/."
        )
    model = load(directory).eval()
    input_size = tuple(resolve_input_data_config(model)["input_size"])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *input_size, generator=generator)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    opset = args.opset or 17
    if opset < 11:
        raise ValueError(f"`--opset >= 11` must hold (token merging sorts), but got {opset}.")
    from torch.onnx import symbolic_helper

    def sort(g: Any, values: Any, *rest: Any) -> Any:
        # Token merging's stable sort (aten::sort.stable / argsort.stable, which the
        # TorchScript exporter refuses) as ONNX TopK, whose ties keep index order: stable.
        dim = symbolic_helper._maybe_get_const(rest[-2], "i")
        descending = symbolic_helper._maybe_get_const(rest[-1], "b")
        return symbolic_helper._sort_helper(g, values, dim, descending=descending)

    def argsort(g: Any, values: Any, *rest: Any) -> Any:
        return sort(g, values, *rest)[1]

    symbolics = {"aten::sort": sort, "aten::argsort": argsort}
    try:
        for name, function in symbolics.items():
            torch.onnx.register_custom_op_symbolic(name, function, opset)
        with warnings.catch_warnings():
            # The tracer warns about every Python branch on shapes; the check below is the test.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(onnx_path),
                dynamo=False,  # the TorchScript exporter needs no onnxscript
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:
        for name in symbolics:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
    try:
        import onnxruntime
    except ImportError:
        print(
            f"wrote {onnx_path} (not checked: install onnxruntime, `pip install 'vitrank[onnx]'`, "
            "to compare it with PyTorch)."
        )
        return 0
    images = torch.randn(3, *input_size, generator=generator)
    with torch.inference_mode():
        expected = model(images).numpy()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # shape-inference warnings of traced reshapes are noise
    session = onnxruntime.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"]
    )
    got = session.run(["logits"], {"images": images.numpy()})[0]
    error = float(abs(got - expected).max())
    tolerance = 1e-4 * max(1.0, float(abs(expected).max()))
    if not error <= tolerance:
        raise RuntimeError(
            f"{onnx_path} disagrees with PyTorch: max |logit difference| {error:.3g} > "
            f"{tolerance:.3g}; please report it with the model directory."
        )
    print(f"wrote {onnx_path}; onnxruntime matches PyTorch (max |logit difference| {error:.2g}).")
    return 0


def _cmd_latency(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spaces import build_space, measure_latency_table, predict_latency

    workload = load_workload_from_args(args)
    device, batch = args.device or "cpu", args.batch or 1
    threads = args.threads or (1 if device == "cpu" else None)
    space = build_space(
        workload.model, model_name=workload.model_name, model_args=dict(workload.model_args)
    )
    table = measure_latency_table(
        workload.model,
        space.fingerprint,
        device=device,
        batch=batch,
        threads=threads,
        space=space,
        repeats=args.repeats or 20,
    )
    out = Path(args.out or f"latency_{workload.name}_{device.replace(':', '')}_b{batch}.json")
    table.save(out)
    smallest = min(predict_latency(space.smallest(c), table) for c in ("params", "flops"))
    print(
        f"saved {out}: {len(table.entries)} operators on {device} at batch {batch}, "
        f"{table.threads} threads ({table.clock} clock); dense model {table.dense_ms:.3f} ms, "
        f"smallest config predicted {smallest:.3f} ms."
    )
    return 0


def _cmd_space(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vitrank.compress.structure import inspect_vit

    workload = load_workload_from_args(args)
    fp = inspect_vit(workload.model, workload.model_name)
    total = sum(p.numel() for p in workload.model.parameters())
    table = Table(title=f"{workload.name}: {fp.architecture}")
    for column in ("block", "dim", "heads", "head dim", "mlp hidden", "biases", "qk norm"):
        table.add_column(column, justify="left" if column in ("block", "biases") else "right")
    table.add_column("params", justify="right")
    for b in fp.blocks:
        biases = "".join(
            flag if on else "-"
            for flag, on in zip(
                "qpfF", (b.qkv_bias, b.proj_bias, b.fc1_bias, b.fc2_bias), strict=True
            )
        )
        table.add_row(
            b.name,
            str(b.dim),
            str(b.num_heads),
            str(b.head_dim),
            str(b.mlp_hidden),
            biases,
            "yes" if b.qk_norm else "no",
            f"{_block_params(b):,}",
        )
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(
        f"tokens {fp.num_tokens} ({fp.num_prefix_tokens} prefix), classes {fp.num_classes}, "
        f"input {tuple(workload.input_size)}, params {total:,} "
        f"({fp.other_params:,} outside the blocks)"
    )
    console.print("biases: q = qkv, p = proj, f = fc1, F = fc2 (- = none)")
    from spaces import OPS, build_space

    space = build_space(
        workload.model,
        ops=args.ops or OPS,
        granularity=args.granularity or 8,
        model_name=workload.model_name,
        model_args=dict(workload.model_args),
    )
    console.print(space.describe(), soft_wrap=True, highlight=False, markup=False)
    return 0


def _block_params(b: Any) -> int:
    inner = b.attn_inner
    qkv = b.dim * 3 * inner + (3 * inner if b.qkv_bias else 0)
    proj = inner * b.dim + (b.dim if b.proj_bias else 0)
    fc1 = b.dim * b.mlp_hidden + (b.mlp_hidden if b.fc1_bias else 0)
    fc2 = b.mlp_hidden * b.dim + (b.dim if b.fc2_bias else 0)
    return qkv + proj + fc1 + fc2 + b.fixed_params


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "search": _cmd_search,
    "report": _cmd_report,
    "apply": _cmd_apply,
    "eval": _cmd_eval,
    "finetune": _cmd_finetune,
    "export": _cmd_export,
    "latency": _cmd_latency,
    "space": _cmd_space,
}


# --- entry point --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = HANDLERS[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("vitrank: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        if args.verbose:
            raise
        from vitrank.compress.structure import UnsupportedModelError

        # the user's input is wrong (a model, a path, a value): say what, exit 2
        usage = isinstance(
            error, (UnsupportedModelError, ValueError, FileNotFoundError, FileExistsError)
        )
        message = str(error) or type(error).__name__
        print(f"vitrank {args.command}: error: {message}", file=sys.stderr)
        if not usage:
            print("(rerun with --verbose for the traceback)", file=sys.stderr)
        return USAGE_ERROR if usage else FAILURE


if __name__ == "__main__":
    sys.exit(main())
