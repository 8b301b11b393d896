"""`moemix` command line: plan, quantize, inspect, eval, serve, demo.

Thin by design: parse arguments, call the library, turn PlanError into a clear
message and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from vllm_moemix.config.spec import DEFAULT_GROUP_SIZE, PACK_CHUNK, SUPPORTED_BITS, UNQUANTIZED, PlanError

COMMANDS_GROUP = "vllm_moemix.commands"


def _bits(value: str) -> int | str:
    """argparse type: 2, 3, 4, 8 or bf16 (argparse turns the error into one line and exit code 2)."""
    if value == UNQUANTIZED:
        return value
    try:
        bits = int(value)
    except ValueError:
        bits = None
    if bits not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a width: use one of {', '.join(map(str, SUPPORTED_BITS))} or {UNQUANTIZED}"
        )
    return bits


def _positive(kind: type):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if not (math.isfinite(number) and number > 0):
            raise argparse.ArgumentTypeError(f"{value!r} must be a positive finite number")
        return number

    return parse


def _group_size(value: str) -> int:
    size = _positive(int)(value)
    if size % PACK_CHUNK:
        raise argparse.ArgumentTypeError(f"{value!r} is not a multiple of {PACK_CHUNK}")
    return size


def _budget(args: argparse.Namespace):
    from vllm_moemix.planning.units import Budget

    if (args.budget is None) == (args.budget_bytes is None):
        raise PlanError("give a budget: --budget AVG_BITS or --budget-bytes N")
    return Budget(avg_bits=args.budget) if args.budget is not None else Budget(nbytes=args.budget_bytes)


def _pins(args: argparse.Namespace) -> dict:
    from vllm_moemix.config.spec import QuantSpec

    pins = {}
    for pin in args.pin or []:
        module, sep, value = pin.partition("=")
        if not sep:
            raise PlanError(f"--pin {pin!r}: expected MODULE=BITS, e.g. 'model.layers.*.self_attn=8'")
        try:
            bits = _bits(value)
        except argparse.ArgumentTypeError as err:
            raise PlanError(f"--pin {pin!r}: {err}") from None
        pins[module] = QuantSpec.from_value(
            bits, QuantSpec(4, args.group_size or DEFAULT_GROUP_SIZE, args.sym), where=module
        )
    return pins


def _calibration(args: argparse.Namespace):
    from vllm_moemix.planning.pipeline import CalibrationConfig

    config = CalibrationConfig.default() if not args.calib else CalibrationConfig(texts=[Path(p) for p in args.calib])
    config.num_samples, config.quantizer, config.device = args.calib_samples, _quantizer(args), args.device
    return config


def _quantizer(args: argparse.Namespace) -> str:
    if args.quantizer:
        return args.quantizer
    uses_strategy = getattr(args, "plan", None) is None and getattr(args, "bits", None) is None
    return "gptq" if uses_strategy or args.calib else "rtn"


def _plan_from_strategy(args: argparse.Namespace, stash=None):
    from vllm_moemix.planning.pipeline import plan_model
    from vllm_moemix.planning.strategies import GROUP_CHOICES

    usage = None
    if args.usage:
        from vllm_moemix.config.routing_profile import load_profile

        usage = load_profile(args.usage)
    result = plan_model(
        args.model,
        args.strategy,
        _budget(args),
        _calibration(args),
        group_size=args.group_size or DEFAULT_GROUP_SIZE,
        sym=args.sym,
        pins=_pins(args),
        progress=not args.quiet,
        usage=usage,
        group_choices=() if args.group_size else GROUP_CHOICES,
        stash=stash,
        error_model=args.error_model,
    )
    print(
        f"{args.strategy} under {result.budget.describe()}: {result.footprint.avg_payload_bits:.3f} bits "
        f"({result.footprint.avg_bits:.3f} with scales/zeros), {result.footprint.nbytes / 2**20:.2f} MiB"
    )
    return result.plan


def cmd_plan(args: argparse.Namespace) -> None:
    plan = _plan_from_strategy(args)
    plan.save(args.output)
    print(f"wrote {args.output}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from vllm_moemix.checkpoint.writer import check_output_dir, quantize_checkpoint
    from vllm_moemix.config.plan import Plan

    if args.plan is not None and args.bits is not None:
        raise PlanError("give at most one of --plan PLAN.json or --bits N")
    if args.validate and (args.plan or args.bits is not None):
        raise PlanError("--validate checks a planned (--strategy/--budget) plan against uniform; not --plan/--bits")
    check_output_dir(Path(args.output))  # before any planning: refusing after an hour of it loses the hour
    with _stash_beside(Path(args.output)) as stash:  # the planner's quantizations, reused by the writer
        if args.plan:
            plan = Plan.load(args.plan)
        elif args.bits is not None:
            plan = Plan.uniform(args.bits, args.group_size, args.sym)
        else:
            reusable = _quantizer(args) == "gptq" and not args.act_order
            plan = _plan_from_strategy(args, stash=stash if reusable else None)
        quantizer = None
        if _should_validate(args):
            fp = _validated(args, plan, stash if len(stash) else None)
            print(
                f"wrote {args.output}: quantizable linears {fp.nbytes / 2**20:.2f} MiB "
                f"(bf16 {fp.bf16_bytes / 2**20:.2f} MiB), average {fp.avg_payload_bits:.3f} bits "
                f"({fp.avg_bits:.3f} with scales/zeros)"
            )
            return
        if _quantizer(args) == "gptq":
            from vllm_moemix.calibration.gptq import CalibratedGPTQ

            calib = _calibration(args)
            quantizer = CalibratedGPTQ(
                args.model,
                calib.texts,
                calib.num_samples,
                act_order=args.act_order,
                progress=not args.quiet,
                device=args.device,
                reuse=stash if len(stash) else None,
            )
        fp = quantize_checkpoint(args.model, plan, args.output, quantizer=quantizer, progress=not args.quiet)
    print(
        f"wrote {args.output}: quantizable linears {fp.nbytes / 2**20:.2f} MiB (bf16 {fp.bf16_bytes / 2**20:.2f} MiB), "
        f"average {fp.avg_payload_bits:.3f} bits ({fp.avg_bits:.3f} with scales/zeros)"
    )


@contextlib.contextmanager
def _stash_beside(output: Path):
    """A scratch directory next to the output (same disk), removed however the command ends (Ctrl-C too)."""
    from vllm_moemix.quant.quantizers import QuantStash

    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.stash-", dir=output.parent))
    try:
        yield QuantStash(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _should_validate(args: argparse.Namespace) -> bool:
    """--validate / --no-validate, else (default) whenever a strategy planned a mix and the whole float model fits
    in memory for the check; says so when it is skipped."""
    if args.validate is not None:
        return args.validate
    if args.plan or args.bits is not None or args.strategy == "uniform":
        return False
    from vllm_moemix.calibration.layerwise import whole_model_fits

    fits, detail = whole_model_fits(args.model)
    if not fits:
        print(f"held-out check skipped: it scores the whole float model ({detail}); --validate forces it")
    return fits


def _validated(args: argparse.Namespace, plan, stash):
    """Quantize the plan and the uniform plan at the same budget, keep whichever scores better on held-out
    calibration text as the output checkpoint (no third quantization); returns its footprint."""
    from transformers import AutoConfig, AutoTokenizer

    from vllm_moemix.calibration.gptq import CalibratedGPTQ
    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.footprint import footprint
    from vllm_moemix.planning.pipeline import plan_model
    from vllm_moemix.quant.quantizers import RTNQuantizer
    from vllm_moemix.report.validate import holdout_windows, validate_against_uniform

    calib = _calibration(args)
    if _quantizer(args) == "gptq":
        quantizer = CalibratedGPTQ(
            args.model,
            calib.texts,
            calib.num_samples,
            act_order=args.act_order,
            progress=False,
            device=args.device,
            reuse=stash,
        )
    else:
        quantizer = RTNQuantizer()
    uniform = plan_model(
        args.model,
        "uniform",
        _budget(args),
        group_size=args.group_size or DEFAULT_GROUP_SIZE,
        sym=args.sym,
        pins=_pins(args),
        progress=False,
    ).plan
    windows = holdout_windows(AutoTokenizer.from_pretrained(args.model), calib.texts, calib.num_samples)
    output = Path(args.output)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.check-", dir=output.parent))
    try:
        check = validate_against_uniform(args.model, plan, uniform, windows, quantizer, keep=scratch)
        print(check.describe())
        if output.exists():  # the empty directory the writer's checks allowed
            output.rmdir()
        os.rename(check.checkpoints[check.winner], output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    chosen = check.uniform if check.uniform_wins else plan
    linears = quantizable_linears(AutoConfig.from_pretrained(args.model))
    return footprint(chosen.resolve(linears), linears)


def cmd_inspect(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from vllm_moemix.checkpoint.reader import read_plan
    from vllm_moemix.config.arch import architecture_for, quantizable_linears
    from vllm_moemix.config.footprint import footprint
    from vllm_moemix.config.plan import Plan
    from vllm_moemix.report.tables import print_report

    path = Path(args.path)
    config = AutoConfig.from_pretrained(path)
    linears = quantizable_linears(config)
    # a plan previewed against a float model before quantizing, or the plan a checkpoint carries
    resolved = Plan.load(args.plan).resolve(linears) if args.plan else read_plan(path)
    print(f"architecture: {architecture_for(config).name} ({config.model_type})")
    print_report(resolved, linears, footprint(resolved, linears))
    from vllm_moemix.layers.introspect import describe_served, reference_fallback_reason
    from vllm_moemix.report.tables import predicted_kernels

    served = predicted_kernels(resolved, linears, architecture_for(config))
    print(f"kernels on this machine's CPU: {describe_served(served)}")
    slow = reference_fallback_reason(served)
    if slow:
        print(f"warning: the slow reference kernel would serve, because {slow}")
    if args.heatmap:
        from vllm_moemix.report.tables import bits_heatmap

        bits_heatmap(resolved, linears, args.heatmap, title=path.name)
        print(f"wrote {args.heatmap}")


def cmd_eval(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from vllm_moemix.report.evaluate import Windows, compare_to_reference, perplexity_vllm, reference_logprobs

    windows = Windows.from_text(AutoTokenizer.from_pretrained(args.model), args.text, max_windows=args.max_windows)
    print(
        f"{args.model}: perplexity through vLLM on {args.text} ({windows.ids.numel():,} tokens): "
        f"{perplexity_vllm(args.model, windows):.3f}"
    )
    if args.reference:
        cmp = compare_to_reference(args.model, windows, reference_logprobs(args.reference, windows))
        print(f"vs {args.reference}: KL {cmp.kl:.5f} nats/token, top-1 agreement {cmp.top1:.2%}")


def cmd_demo(args: argparse.Namespace) -> None:
    from vllm_moemix.cli.demo import run_demo

    run_demo(args.model, Path(args.plan), Path(args.workdir), Path(args.calib), baseline=not args.no_baseline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemix", description="Mixed-bit MoE quantization for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in entry_points(group=COMMANDS_GROUP):  # e.g. `moemix serve`, registered by the server package
        command.load()(sub)

    def planning_args(p: argparse.ArgumentParser, default_strategy: str) -> None:
        from vllm_moemix.planning.errors import ERROR_MODELS
        from vllm_moemix.planning.strategies import STRATEGIES
        from vllm_moemix.quant.quantizers import QUANTIZERS

        p.add_argument(
            "--strategy",
            default=default_strategy,
            choices=sorted(STRATEGIES),
            help="bit-allocation strategy (docs/planning.md)",
        )
        p.add_argument(
            "--budget", type=_positive(float), help="average integer bits per weight over the quantizable linears"
        )
        p.add_argument(
            "--budget-bytes", type=_positive(int), help="or: bytes of the quantizable linears incl. scales/zeros"
        )
        p.add_argument("--pin", action="append", help="fix a width, e.g. 'model.layers.*.self_attn=8' (repeatable)")
        p.add_argument("--calib", nargs="+", help="calibration text file(s) (default: models/calib.txt)")
        p.add_argument(
            "--usage",
            help="routing profile saved from a server (GET /v1/moemix/routing, one model's "
            "entry): expert frequencies for --strategy frequent-experts",
        )
        p.add_argument("--calib-samples", type=_positive(int), default=32, help="windows of 256 tokens")
        p.add_argument(
            "--error-model",
            choices=ERROR_MODELS,
            default="auto",
            help="how the optimizer prices a width for a unit (docs/planning.md): fisher (the loss change through "
            "the network; the model and its gradients must fit in memory), estimate (layer-local output error, "
            "any size), full (estimate's reference); auto (default): fisher when it fits, else estimate",
        )
        p.add_argument(
            "--quantizer", choices=QUANTIZERS, help="default: gptq when a strategy plans or --calib is given, else rtn"
        )
        p.add_argument(
            "--group-size",
            type=_group_size,
            default=None,
            help="group size along K (default 128; with a --budget-bytes "
            "the optimizer then picks 32, 64, 128 or 256 per module)",
        )
        p.add_argument("--sym", action="store_true", help="symmetric (no zero points)")
        p.add_argument(
            "--device",
            help="where calibration, Hessians and GPTQ run, e.g. cuda or cpu (default: cuda if available)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("quantize", help="quantize a safetensors MoE checkpoint per a plan, --bits, or a strategy")
    q.add_argument("model", help="Hugging Face model directory (safetensors)")
    q.add_argument("--plan", help="plan JSON (module -> bits); see docs/checkpoint-format.md")
    q.add_argument("--bits", type=_bits, help="uniform shortcut: 2, 3, 4, 8 or bf16 for every quantizable linear")
    q.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal")
    q.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the planned mix and uniform at the same budget, score both on calibration text "
        "the planner did not see, keep the better (says so when uniform wins); default: on for planned mixes "
        "when the whole float model fits in memory for the check",
    )
    q.add_argument("-o", "--output", required=True, help="output directory (must not hold a checkpoint)")
    planning_args(q, "optimizer")
    q.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plan", help="choose widths with a strategy under a budget; write the plan JSON")
    p.add_argument("model", help="Hugging Face model directory (safetensors)")
    p.add_argument("-o", "--output", required=True, help="plan JSON to write")
    planning_args(p, "optimizer")
    p.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="table of widths and bytes of a moemix checkpoint (or a plan on a model)")
    i.add_argument("path", help="moemix checkpoint, or a float model with --plan")
    i.add_argument("--plan", help="preview this plan on the float model at PATH")
    i.add_argument("--heatmap", help="also write a PNG heatmap of bits over layers x experts")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="held-out perplexity through vLLM (+ KL / top-1 agreement vs a reference)")
    e.add_argument("model", help="model or moemix checkpoint directory")
    e.add_argument("--text", default="models/heldout.txt", help="held-out text file")
    e.add_argument("--reference", help="float model to compare next-token distributions with")
    e.add_argument("--max-windows", type=int, default=32, help="windows of 256 tokens")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="quantize the embedded model with a mixed plan, serve it in vLLM, report")
    d.add_argument("--model", default="models/tiny-mixtral")
    d.add_argument("--plan", default="plans/tiny-mixtral-mixed.json")
    d.add_argument("--workdir", default="runs/demo", help="where the demo writes its checkpoint (replaced each run)")
    d.add_argument("--calib", default="models/calib.txt", help="GPTQ calibration text")
    d.add_argument("--no-baseline", action="store_true", help="skip the bf16 run used for side-by-side numbers")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PlanError as err:
        print(f"moemix: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
