"""`moemix` command line: quantize, inspect, demo.

Thin by design: parse arguments, call the library, turn PlanError into a clear
message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_moemix.spec import UNQUANTIZED, PlanError


def _bits(value: str) -> int | str:
    return value if value == UNQUANTIZED else int(value)


def cmd_quantize(args: argparse.Namespace) -> None:
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.plan import Plan

    if (args.plan is None) == (args.bits is None):
        raise PlanError("give exactly one of --plan PLAN.json or --bits N")
    plan = Plan.load(args.plan) if args.plan else Plan.uniform(args.bits, args.group_size, args.sym)
    fp = quantize_checkpoint(args.model, plan, args.output, progress=not args.quiet)
    print(
        f"wrote {args.output}: quantizable linears {fp.nbytes / 2**20:.2f} MiB (bf16 {fp.bf16_bytes / 2**20:.2f} MiB), "
        f"average {fp.avg_payload_bits:.3f} bits ({fp.avg_bits:.3f} with scales/zeros)"
    )


def cmd_inspect(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from vllm_moemix.arch import quantizable_linears
    from vllm_moemix.checkpoint.reader import read_plan
    from vllm_moemix.footprint import footprint
    from vllm_moemix.report import print_report
    from vllm_moemix.plan import Plan

    path = Path(args.path)
    if args.plan:  # preview a plan against a float model before quantizing
        linears = quantizable_linears(AutoConfig.from_pretrained(path))
        resolved = Plan.load(args.plan).resolve(linears)
    else:
        resolved = read_plan(path)
        linears = quantizable_linears(AutoConfig.from_pretrained(path))
    print_report(resolved, linears, footprint(resolved, linears))


def cmd_demo(args: argparse.Namespace) -> None:
    from vllm_moemix.demo import run_demo

    run_demo(args.model, Path(args.plan), Path(args.workdir), baseline=not args.no_baseline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemix", description="Mixed-bit MoE quantization for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a safetensors MoE checkpoint per a bit plan")
    q.add_argument("model", help="Hugging Face model directory (safetensors)")
    q.add_argument("--plan", help="plan JSON (module -> bits); see docs/checkpoint-format.md")
    q.add_argument("--bits", type=_bits, help="uniform shortcut: 2, 3, 4, 8 or bf16 for every quantizable linear")
    q.add_argument("--group-size", type=int, default=None, help="with --bits: group size along K (default 128)")
    q.add_argument("--sym", action="store_true", help="with --bits: symmetric (no zero points)")
    q.add_argument("-o", "--output", required=True, help="output directory (must not hold a checkpoint)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="table of widths and bytes of a moemix checkpoint (or a plan on a model)")
    i.add_argument("path", help="moemix checkpoint, or a float model with --plan")
    i.add_argument("--plan", help="preview this plan on the float model at PATH")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="quantize the embedded model with a mixed plan, serve it in vLLM, report")
    d.add_argument("--model", default="models/tiny-mixtral")
    d.add_argument("--plan", default="plans/tiny-mixtral-mixed.json")
    d.add_argument("--workdir", default="runs/demo", help="where the demo writes its checkpoint (replaced each run)")
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
