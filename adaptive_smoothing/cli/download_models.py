"""Download the published checkpoints (docs/METHOD.md, "Published models") into a model root
folder."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import click

from adaptive_smoothing.cli.errors import one_line_errors
from adaptive_smoothing import download
from adaptive_smoothing.published import PUBLISHED_NAMES


@click.command()
@click.option("--root-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("models"), show_default=True,
              help="Model root folder (gets Base/ and CompModel/).")
@click.option("--only", "names", multiple=True,
              help="Download only this entry (repeatable); see --list for names.")
@click.option("--dataset", default=None,
              help="Only the entries of this dataset (cifar10 / cifar100, 'CIFAR-10' too).")
@click.option("--model", type=click.Choice(PUBLISHED_NAMES), default=None,
              help="Only the files this published model needs (STD, ROB, mixer if any).")
@click.option("--force", is_flag=True, help="Download again even where the file exists.")
@click.option("--list", "list_only", is_flag=True, help="List the entries and exit.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@one_line_errors
def main(root_dir: Path, names: tuple[str, ...], dataset: Optional[str], model: Optional[str],
         force: bool, list_only: bool, no_progress: bool) -> None:
    """Download the published checkpoints into ROOT_DIR/Base and ROOT_DIR/CompModel."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    download.route_library_logs()
    try:
        sources = download.select_sources(names or None, dataset, model)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if list_only:
        click.echo(download.format_table(sources))
        return
    results = download.download_sources(root_dir, sources, force=force,
                                        progress=not no_progress)
    failed = [name for name, error in results.items() if error is not None]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} download(s) failed: "
                                   f"{', '.join(failed)}")


if __name__ == "__main__":
    main()
