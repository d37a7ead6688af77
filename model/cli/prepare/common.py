"""Command-line plumbing shared by the converter sub-commands of ``python -m model.cli.prepare``.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from model.data.prepare import ConvertOptions

T = TypeVar("T")



def add_common_arguments(parser: argparse.ArgumentParser, default_prefix: str = "") -> None:
    """Options every converter accepts: image-path prefix, caption cleaning, progress bars."""
    parser.add_argument(
        "--image-prefix",
        default=default_prefix,
        help="prefix prepended to every written image path, e.g. 'coco/' when all sources share "
        f"one image root (default: {default_prefix!r})",
    )
    parser.add_argument(
        "--clean-captions",
        action="store_true",
        help="apply ALBEF's pre_caption now (default: store raw captions; ALBEF cleans at load "
        "time)",
    )
    parser.add_argument(
        "--max-words", type=int, default=30, help="word limit for --clean-captions (default: 30)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="never show progress bars (default: on a TTY)"
    )


def progress_flag(args: argparse.Namespace) -> bool | None:
    """Map ``--no-progress`` to the ``show_progress`` argument of the converters."""
    return False if args.no_progress else None


def new_subparser(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    doc: str | None,
    run: Callable[[argparse.Namespace], Any],
) -> argparse.ArgumentParser:
    """Register the sub-command ``name``, carried out by ``run(args)``.

    Its ``--help`` shows ``doc`` (the converter's module docstring) verbatim below the usage.
    """
    parser = subparsers.add_parser(
        name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(run=run)
    return parser


def common_options(args: argparse.Namespace) -> ConvertOptions:
    """The converters' shared options, from :func:`add_common_arguments`'s flags."""
    return ConvertOptions(image_prefix=args.image_prefix, clean_captions=args.clean_captions,
                          max_words=args.max_words, show_progress=progress_flag(args))


def call_converter(convert: Callable[..., T], args: argparse.Namespace, **renamed: str) -> T:
    """Call ``convert`` with the parsed options that are named like its parameters.

    Args:
        convert: A ``prepare_*`` function.
        args: The parsed command line (the common flags become ``options``,
            :func:`common_options`).
        renamed: Parameter name → option attribute, where the two differ (``images_dir="images"``
            for ``--images``).

    Raises:
        TypeError: If a parameter has no option, so a converter and its command line cannot
            silently drift apart.
    """
    options = {**vars(args), "options": common_options(args)}
    kwargs = {}
    for name in inspect.signature(convert).parameters:
        key = renamed.get(name, name)
        if key not in options:
            raise TypeError(f"{convert.__name__}: no command-line option for parameter {name!r}")
        kwargs[name] = options[key]
    return convert(**kwargs)
