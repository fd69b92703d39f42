"""The flags, list syntax and exit codes that every ``pipelines/*.py`` shares (no torch import: bad input fails fast).

Vocabulary (a flag means the same wherever it appears):

``--out PATH``      output folder (parent of the run folders where a pipeline has runs)
``--run NAME``      name of the run folder under ``--out``
``--device NAME``   torch device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``
``--threads N``     torch intra-op CPU threads for this run (default: torch's own choice)
``-v/--verbose``    more log lines; ``-q/--quiet``: warnings only, no progress bar
lists               one comma-separated value, ``all`` for every valid name: ``--targets malignancy,spiculation``

Exit codes: 0 done; 2 a bad argument or input, with one sentence on stderr (``<prog>: error: ...``);
1 an unexpected failure (the traceback is printed).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def exit_process(code: int | None) -> NoReturn:
    """End the process with ``code`` without the interpreter's last garbage collections over every imported object.

    Why: after torch, timm and MONAI are imported, those collections take 1.3-1.6 s of every run's exit on the
    2-core machine (0.3 s once the objects are frozen out of the collector). Only the search for reference cycles is
    skipped: the exit handlers still run (logging flushes, temporary folders go), the standard streams are flushed,
    and what an object caught in a cycle still holds open the OS closes (every ctcdam write is closed and renamed
    before, ``io.atomic_file``).
    """
    gc.freeze()
    sys.exit(code)


#: Device names accepted by ``--device`` (checked here; availability is checked where the device is used).
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def one_line(message: object) -> str:
    """A message as one line: newlines and runs of spaces (jsonargparse, multi-line errors) collapse into one space."""
    return " ".join(str(message).split())


def report_error(prog: str, error: BaseException | str) -> int:
    """Print ``<prog>: error: <one sentence>`` on stderr and return the exit code of bad input (2)."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the ctcdam conventions: examples after the options, bad arguments exit 2 with one sentence."""

    def __init__(self, prog: str, description: str, examples: str, **kwargs: object):
        super().__init__(
            prog=prog,
            description=description,
            epilog="examples:\n" + examples.rstrip() + "\n",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,  # type: ignore[arg-type]
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        """One sentence and exit 2 (argparse's default also prints the whole usage block)."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def add_out(parser: argparse.ArgumentParser, default: str | Path | None, what: str = "output folder") -> None:
    """``--out PATH`` (a Path; None stays None for pipelines whose default depends on other flags)."""
    shown = f" (default: {default})" if default is not None else ""
    parser.add_argument(
        "--out", type=Path, default=None if default is None else Path(default), metavar="PATH", help=f"{what}{shown}"
    )


def add_run(parser: argparse.ArgumentParser, help: str) -> None:
    """``--run NAME``: the run folder's name under --out."""
    parser.add_argument("--run", metavar="NAME", help=help)


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="more log lines")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")


def setup_logging(args: argparse.Namespace, default: int = logging.INFO, **basic_config: Any) -> None:
    """Root logging at `default` (WARNING with ``-q``); ``-v`` shows ctcdam's own lines one level further.

    Only ctcdam's logger goes further with ``-v`` (DEBUG after INFO, INFO after WARNING): third-party
    libraries keep their level, so their debug output does not drown ours.
    """
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logging.basicConfig(level=max(default, logging.WARNING) if quiet else default, **basic_config)
    if verbose:
        logging.getLogger("ctcdam").setLevel(max(logging.DEBUG, default - 10))


def device_name(text: str) -> str:
    """argparse type of ``--device``: a torch device name or ``auto``."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device NAME``."""
    parser.add_argument(
        "--device", type=device_name, default=default, metavar="NAME",
        help=f"torch device: auto (CUDA when available), cpu, cuda, cuda:N, mps (default: {default})",
    )


def _whole_number(text: str, minimum: int, failure: str) -> int:
    """``text`` as an int of at least ``minimum``; argparse's error otherwise (``failure`` formats the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(failure.format(value))
    return value


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    return _whole_number(text, 1, "{} is not a positive number")


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0."""
    return _whole_number(text, 0, "{} is negative")


def shard_spec(text: str) -> tuple[int, int]:
    """argparse type of ``--shard i/n``: this task's share, every n-th item from i (0 <= i < n)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form i/n (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r} needs 0 <= i < n")
    return index, count


def add_shard(parser: argparse.ArgumentParser, what: str = "scan") -> None:
    """``--shard i/n`` and ``--resume`` (the SLURM-array pair: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    parser.add_argument("--shard", type=shard_spec, default=(0, 1), metavar="i/n",
                        help=f"process every n-th {what} from i, 0 <= i < n (default: 0/1, all)")
    parser.add_argument("--resume", action="store_true",
                        help=f"keep the {what}s an earlier run finished with the same settings (re-verified)")


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``."""
    parser.add_argument(
        "--threads", type=positive_int, metavar="N", help="torch intra-op CPU threads for this run (default: torch's choice)"
    )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block and restore it after (in-process callers keep theirs)."""
    if threads is None:
        yield
        return
    import torch  # deferred: a pipeline checks its arguments before paying for the import

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def name_list(valid: Sequence[str] | None = None, what: str = "name") -> Callable[[str], tuple[str, ...] | None]:
    """argparse type of a comma-separated list; ``all`` means every valid name (None when there is no fixed set).

    With `valid`, unknown names are refused in one sentence that lists the valid ones.
    """

    def parse(text: str) -> tuple[str, ...] | None:
        if text.strip() == "all":
            return tuple(valid) if valid is not None else None
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given; pass a comma-separated list or 'all'")
        unknown = [n for n in names if valid is not None and n not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown)}; choose from {', '.join(valid or ())} or 'all'"
            )
        return names

    parse.__name__ = f"{what} list"  # argparse names the type in its messages
    return parse
