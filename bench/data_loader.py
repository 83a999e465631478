"""Does data preparation keep up with training? Batches per second from the loader against training steps.

    python bench/data_loader.py [--config recipes/scienceqa/demo-cpu.yaml] [--batches 20] [--threads 2] [overrides]

Overrides go to the recipe, e.g. ``--data.init_args.train_split test`` loads the ScienceQA sample's test split,
whose images are present, so decoding real PNGs is timed.

Times, in one process, (a) producing training batches with the recipe's own data module and collator in the main
process (num_workers=0: the worst case; workers only add throughput) and (b) training steps of the recipe's
model on those batches. Prints the ratio; target: the loader is at least 10x faster.
"""

import argparse
import statistics
import time

import torch
from train_step import time_train_step  # bench/ is on sys.path when run as a script

from mma.recipe import config_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/scienceqa/demo-cpu.yaml")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)

    cli = config_cli(args.config, ["--data.init_args.num_workers", "0", *overrides])
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    module.configure_model()
    data.trainer = trainer
    trainer.strategy.connect(module)
    data.setup("fit")
    loader = data.train_dataloader()

    batches, load_times = [], []
    iterator = iter(loader)
    for _ in range(args.batches):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        load_times.append(time.perf_counter() - start)
        batches.append(batch)

    model = module.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step_times = [time_train_step(model, batch, optimizer) for batch in batches[: max(3, args.batches // 4)]]

    load, step = statistics.median(load_times), statistics.median(step_times[1:])
    print(f"{args.config}: batch {data.batch_size}, median over {args.batches} batches / {len(step_times) - 1} steps")
    print(f"prepare one batch: {1000 * load:.1f} ms   training step: {1000 * step:.1f} ms")
    print(f"loader speed / training speed: {step / load:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
