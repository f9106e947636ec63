"""The console of the command line: third-party chatter about nothing a user of this project can
act on is silenced by message, and a bad setting or a failing constructor is reported in one
message, without the option parser's dump of every alternative it tried.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import linecache
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("layerdiff", "data", "callbacks")

# logger -> what it says that is silenced, and why in one comment each
QUIET_LOG_RECORDS = {
    # Lightning's advertising; it has no switch (Lightning-AI/pytorch-lightning issue 21294)
    "lightning.pytorch.utilities.rank_zero": re.compile(r"💡 Tip: "),
    "lightning.fabric.utilities.rank_zero": re.compile(r"💡 Tip: "),
    # bitsandbytes' 4-bit CPU inference kernel; we use its 8-bit optimiser only
    "bitsandbytes.backends.cpu.ops": re.compile(r"Failed to load CPU gemm_4bit_forward"),
    # image processors of models we never load: our text encoders take no images
    "transformers.utils.import_utils": re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\)"),
    # casting a model that keeps no module in float32 (the list is empty) is exact
    "diffusers.models.modeling_utils": re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\."),
}
QUIET_WARNINGS = (
    # frozen parts (base VAE, text encoders, ...) stay in eval mode by design; the model summary
    # counts them once, as "Modules in eval mode"
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # our scripts build ``args`` from their own command line on purpose
    r"LightningCLI's args parameter is intended to run from within Python",
    # Lightning's own use of a torch API that the pinned torch deprecates
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
# predict takes a training checkpoint's weights; its training callbacks' states are not wanted there
TRAINING_CALLBACK_STATES = r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_console() -> None:
    """Silence ``QUIET_LOG_RECORDS`` and ``QUIET_WARNINGS``, hide transformers' per-file "Loading
    weights" bar (downloads keep theirs) and W&B's console lines while it runs offline
    (``WANDB_SILENT=false`` shows them). Safe to call again; call it before importing diffusers."""
    for name, pattern in QUIET_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(known, _DropMatching) for known in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run"):
        if not os.environ.get("WANDB_SILENT"):  # unset or empty (W&B rejects an empty value)
            os.environ["WANDB_SILENT"] = "true"
        if os.environ["WANDB_SILENT"].lower() in ("true", "1"):
            _silence_wandb_terminal()
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_tqdm_hook(_without_loading_weights_bar)


def _silence_wandb_terminal() -> None:
    # W&B applies WANDB_SILENT only after validating its settings, so the warning Lightning's
    # WandbLogger triggers there (it always passes `anonymous`) would still print.
    import wandb
    from wandb.errors import term

    term.termsetup(wandb.Settings(silent=True), None)


def _without_loading_weights_bar(factory, args, kwargs):
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


class ShortErrorParser(LightningArgumentParser):
    """Reports a bad command line or config in one message naming the setting (with the closest
    accepted name), instead of the usage text and every union alternative jsonargparse tried."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # a nested parse: the outer parser reports it
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {short_parse_error(message, parser)}\n")
        sys.stderr.write(f"For the accepted options run: {parser.prog.replace(' [options]', '')} --help\n")
        sys.exit(2)


_UNION_NOISE = re.compile(
    r"^\s*(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|- Expected a <class 'NoneType'>"
    r"|Given value type: .*|Given value: .*)$"
)
_NOT_ACCEPTED = re.compile(r"Problem with given class_path '(?P<path>[^']+)':\s*Option '(?P<key>[^']+)' is not accepted")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<option>--[^\s=]+)")
_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":')


def short_parse_error(message: str, parser: LightningArgumentParser) -> str:
    """jsonargparse's ``message`` without the union dump; a misspelt key with a did-you-mean."""
    not_accepted = _NOT_ACCEPTED.search(message)
    if not_accepted:
        path, key = not_accepted["path"], not_accepted["key"]
        where = _PARSER_KEY.match(message)
        text = f"'{key}' is not an argument of {path}" + (f" (in '{where['key']}')" if where else "")
        return text + did_you_mean(key, init_arguments(path))
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        return message + did_you_mean(unrecognized["option"], list(parser._option_string_actions))
    kept = [line for line in message.splitlines() if line.strip() and not _UNION_NOISE.match(line)]
    return "\n".join(kept)


def did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def init_arguments(class_path: str) -> list[str]:
    """The constructor argument names of ``class_path``, for a hint; none if it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [parameter.name for parameter in parameters if parameter.kind is not parameter.VAR_KEYWORD]


def constructor_error(error: BaseException) -> BaseException:
    """The exception under jsonargparse's wrappers: what a constructor itself raised."""
    while error.__cause__ is not None and _raised_in(error, "jsonargparse"):
        error = error.__cause__
    return error


def is_project_error(error: BaseException) -> bool:
    """Raised on purpose by the project: one of its own exception types, or any exception its
    code raises with a ``raise`` statement (a bug's exception comes from some other line)."""
    if type(error).__module__.split(".")[0] in PROJECT_PACKAGES:
        return True
    frame = _innermost(error)
    if frame is None or not _in_project(frame.tb_frame.f_code.co_filename):
        return False
    return linecache.getline(frame.tb_frame.f_code.co_filename, frame.tb_lineno).lstrip().startswith("raise ")


def _innermost(error: BaseException):
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame


def _raised_in(error: BaseException, package: str) -> bool:
    frame = _innermost(error)
    return frame is not None and f"{os.sep}{package}{os.sep}" in frame.tb_frame.f_code.co_filename


def _in_project(filename: str) -> bool:
    try:
        parts = Path(filename).resolve().relative_to(PROJECT_ROOT).parts
    except ValueError:
        return False
    return len(parts) > 1 and parts[0] in PROJECT_PACKAGES
