"""``python -m bench``: run the benchmarks, print each as a JSON line and a table, save the results."""

import click
import torch

from bench import common, memory, peer, photos, side_by_side, throughput, tuning
from pipeline.config import ThreadsConfig

BENCHMARKS = {
    "throughput": throughput.run,  # 1 and 2: against the book's loop and the compute floor
    "memory": memory.run,  # 4: `main` with the default settings
    "tuning": tuning.run,  # 3 (and 4 for `tune --workers 2`): a fixed study with 1 and 2 workers
    "side_by_side": side_by_side.run,  # 5: a 100-trial study, one trial at a time against side by side
    "photos": photos.run,  # predict on test garments pasted on generated photo backgrounds, per background
    "peer": peer.run,  # tune's default against the same study written as optuna-examples writes it
}


@click.command()
@click.option("--only", multiple=True, type=click.Choice(list(BENCHMARKS)),
              help="Run just these benchmarks (repeatable); default: all.")
@click.option("--quick", is_flag=True,
              help="Smoke run: a tiny slice, few epochs and trials. The figures mean nothing.")
@click.option("--data-dir", default=None, help="Folder with the raw Fashion-MNIST files "
              "(default: where `python -m pipeline locate-data` finds them).")
@click.option("--results", type=click.Path(dir_okay=False), default=str(common.RESULTS_FILE), show_default=True,
              help="JSON file the results are merged into.")
def main(only, quick, data_dir, results):
    """Measure training speed, tuning throughput and memory."""
    torch.set_num_threads(ThreadsConfig().threads)  # what the commands train with (each sets it at its start)
    done = []
    for name in only or BENCHMARKS:
        click.echo(f"== {name} ==", err=True)
        for result in BENCHMARKS[name](quick, data_dir):
            common.report(result)
            done.append(result)
    path = common.save(done, results)
    missed = [f"{r.benchmark}: {t['target']}" for r in done for t in r.targets.values() if not t["met"]]
    click.echo(f"results written to {path}", err=True)
    if missed and not quick:
        click.echo("targets missed:\n  " + "\n  ".join(missed), err=True)


if __name__ == "__main__":
    main()
