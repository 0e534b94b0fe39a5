"""``lossaudit explain``: the reduction math on a tiny example, step by step."""

from __future__ import annotations

import argparse

from ...audit.options import BY_NAME, parse_int, seed_check

HELP = "walk through the loss-reduction math on a tiny example"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME",
                   help="also run the two-microbatch walkthrough on this model's batch (a model_type or directory)")
    seed = BY_NAME["seed"]  # the audit's seed option: the same parser, range and help
    p.add_argument("--seed", type=_seed, default=seed.default, metavar=seed.metavar, help=seed.help)


def _seed(text: str) -> int:
    try:
        value = parse_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    problem = seed_check(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def run(args: argparse.Namespace) -> int:
    from ...audit import walkthrough as wt

    model = wt.model_step(args.model, seed=args.seed) if args.model else None  # bad names fail first
    print(wt.seed_text(wt.seed_example()))
    print()
    steps = wt.walk(*wt.bigram_step())
    print(wt.walkthrough_text(steps, "2. Two microbatches with uneven target counts "
                                     "(a bigram model whose logits are log P)"))
    print()
    print("  the gradient dL/dW of the bigram table (rows: current token; columns: next token)")
    for name in ("num_items", "mean_of_means"):
        print(wt.gradient_table(steps, name))
    if model:
        ctx, layout = model
        print()
        print(wt.walkthrough_text(wt.walk(ctx, layout), f"3. The same on {args.model}'s batch "
                                  f"({ctx.loaded.parameters:,} parameters, {len(ctx.batch)} sequences)"))
    return 0
