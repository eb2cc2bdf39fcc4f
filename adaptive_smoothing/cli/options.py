"""Click options shared by several commands."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

import click
import yaml

F = TypeVar("F", bound=Callable[..., object])

PRECISIONS = ("fp32", "bf16", "fp16")
# Without a final full stop: commands append where the default comes from.
PRECISION_HELP = ("Autocast dtype: bf16 on CUDA or CPU (faster only where the CPU has native "
                  "bf16), fp16 on CUDA only")
THREADS_HELP = "torch threads [default: OMP_NUM_THREADS, else the cores]."


def threads_option(help: str = THREADS_HELP) -> Callable[[F], F]:
    """``--threads N`` (>= 1; None = runtime.configure_threads's default)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


def speed_options(*, precision: Optional[str], channels_last: Optional[bool],
                  compile: Optional[bool], precision_help: Optional[str] = PRECISION_HELP + ".",
                  channels_last_help: Optional[str] = "NHWC memory format for the models.",
                  compile_help: Optional[str] = "torch.compile the model.",
                  threads_help: str = THREADS_HELP,
                  precisions: Sequence[str] = PRECISIONS) -> Callable[[F], F]:
    """The speed flags: ``--precision``, ``--channels-last/--no-channels-last``,
    ``--compile/--no-compile`` (parameter ``compile_model``) and ``--threads``.

    The defaults are the command's (None where a config file supplies the value); the help texts
    say what the flags act on in that command.
    """
    options = [
        click.option("--precision", type=click.Choice(list(precisions)), default=precision,
                     help=precision_help),
        click.option("--channels-last/--no-channels-last", default=channels_last,
                     help=channels_last_help),
        click.option("--compile/--no-compile", "compile_model", default=compile,
                     help=compile_help),
        threads_option(threads_help),
    ]

    def decorate(function: F) -> F:
        # click lists options in the order their decorators are written, i.e. applied last first.
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def parse_set_items(items: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {dotted key: YAML value}."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise click.ClickException(f"--set {item!r}: expected KEY=VALUE with a dotted config "
                                       "key, e.g. --set training_settings.lr=1e-4")
        try:
            overrides[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err)
            raise click.ClickException(f"--set {item!r}: the value is not valid YAML "
                                       f"({problem}); quote it") from None
    return overrides
