"""The command-line boundary shared by hf_prune.py, post_training.py, evaluate.py, generate.py, test_speedup.py.

Every script ends with ``cli.run(main, "SCRIPT.py")``: a failure prints ONE line,
``SCRIPT.py: error: ...``, naming the flag or file, the bad value and what is allowed, and exits with

    2  a usage error: a bad flag value or input (missing/corrupt model, bad data file, unreachable Hub
       for a Hub name, unavailable device, unwritable output folder)
    1  a runtime failure (disk full, out of memory, a bug); the line says what happened
  130  interrupted (Ctrl-C)

The traceback is printed only with ``--debug`` or ``LLMPRUNER_DEBUG=1``. The ``check_*`` helpers are
the scripts' argument validation: they run before any model is loaded, so bad flags fail in seconds.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, Sequence
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

DEBUG_ENV = "LLMPRUNER_DEBUG"
#: functions that read a user's input: an error raised inside one is a usage error (exit 2)
INPUT_READERS = frozenset({"load_model", "load_pruned", "load_for_eval", "load_meta", "load_gguf",
                           "load_legacy_pickle", "read_documents", "load_ppl_text", "load_instruction_records",
                           "build_instruction_datasets", "build_text_eval_dataset", "calibration_examples",
                           "local_task_config", "from_pretrained"})
HUB_MARKERS = ("couldn't connect to 'https://huggingface.co'", "offline mode", "OfflineModeIsEnabled",
               "LocalEntryNotFoundError", "Name or service not known", "Couldn't reach")


class UsageError(ValueError):
    """A bad flag value or input file; the message names the flag, the value and what is allowed."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every script's ``--help``: ``(default: X)`` once, and only where a default says something (not
    ``None`` or ``False``, not where the help text already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"print the full traceback on failure (or set {DEBUG_ENV}=1)")


def default_device() -> str:
    """What the machine has: ``cuda`` if available, else ``cpu``."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(flag: str, value: str) -> str:
    """``value`` if this machine has that device, else a UsageError saying what it has."""
    import torch
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {value!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"{flag} {value}: CUDA is not available ({why}); use {flag} cpu "
                             f"(the default on this machine)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {value}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {value}: MPS is not available on this machine; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {value}: unsupported device type {device.type!r}; use cpu or cuda")
    return value


def check_min(flag: str, value: float | None, minimum: float, what: str = "") -> None:
    """``value >= minimum`` (``None`` passes: the flag's "not set")."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value}: must be >= {minimum}{what}")


def check_writable_dir(flag: str, folder: str | Path) -> Path:
    """A folder that exists and is writable, or can be created (nothing is created here)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(folder)!r}: exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {str(folder)!r}: {probe} is a file, so the folder cannot be created")
    try:  # a real probe: os.access says yes to root even on read-only or pseudo file systems
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or type(err).__name__
        raise UsageError(f"{flag} {str(folder)!r}: cannot write in {probe} ({why}); choose a folder you "
                         "can write to") from None
    return path


def looks_local(value: str) -> bool:
    """A path rather than a Hub name: it exists, starts like a path, has an extension or >1 slash, or its
    first part is a local folder (``prune_log/llama_prnue`` beside ``prune_log/``: a typo, not a Hub id)."""
    path = Path(value).expanduser()
    return (path.exists() or value.startswith((".", "/", "~")) or value.count("/") > 1
            or ("/" in value and Path(value.split("/")[0]).is_dir())
            or path.suffix in (".json", ".jsonl", ".txt", ".raw", ".bin", ".pt", ".pth", ".gguf", ".safetensors"))


def missing_path(flag: str, value: str) -> str:
    """``FLAG 'VALUE': no such file or folder``, with the nearest names in its folder when there are any."""
    import difflib
    path = Path(value).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3) if parent.is_dir() else []
    hint = f" (did you mean {', '.join(repr(str(parent / n)) for n in near)}?)" if near else ""
    return f"{flag} {value!r}: no such file or folder{hint}"


def check_source(flag: str, value: str, kind: Literal["model", "dataset"], local_hint: str, *,
                 hub_name: str | None = None) -> None:
    """A local path must exist; a Hub name needs the Hub (or the local cache) to be reachable.

    ``local_hint`` is what to pass instead, e.g. ``"--base_model ../shared/models/stories260K"``;
    ``hub_name`` is the Hub name behind ``value`` when they differ (``wikitext2`` -> ``wikitext``).
    """
    if looks_local(value):
        if not Path(value).expanduser().exists():
            raise UsageError(missing_path(flag, value))
        return
    if hub_reachable() or _in_hf_cache(hub_name or value, kind):
        return
    raise UsageError(f"{flag} {value!r}: a Hugging Face Hub {kind} name, but the Hub is unreachable "
                     f"({_why_offline()}) and it is not in the local cache; pass a local path instead, "
                     f"e.g. {local_hint}")


_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be contacted: False at once in offline mode, else one TCP connect (cached).

    When it cannot, offline mode is switched on for this process, so that cached files load without
    the libraries' ~25 s of retries.
    """
    global _REACHABLE
    if _offline_env():
        return False
    if _REACHABLE is None:
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
            _REACHABLE = True
        except OSError:
            _REACHABLE = False
            _go_offline()
    return _REACHABLE


def _offline_env() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _why_offline() -> str:
    if _REACHABLE is False:  # the probe failed (and then switched offline mode on)
        return f"no network connection to {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}"
    return "HF_HUB_OFFLINE=1"


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _in_hf_cache(name: str, kind: str) -> bool:
    try:
        if kind == "model":
            from huggingface_hub import try_to_load_from_cache
            return isinstance(try_to_load_from_cache(name, "config.json"), str)
        from datasets import config
        cache = Path(config.HF_DATASETS_CACHE)
        key = name.replace("/", "___")
        return cache.is_dir() and any(key in p.name for p in cache.iterdir())
    except Exception:  # a broken cache is not this check's business
        return False


#: the reference's generate.py / test_speedup.py ``--model_type`` values
MODEL_TYPES = ("pretrain", "pruneLLM", "tune_prune_LLM")


def reference_model(args) -> tuple[str, str | None, str]:
    """``(model, lora, flag naming the model)`` from ``--model``/``--lora``, or from the reference's
    ``--model_type`` with ``--base_model`` / ``--ckpt`` / ``--lora_ckpt`` (an argparse namespace)."""
    if args.model_type is None:
        if args.model is None:
            raise UsageError("--model is required (a base or pruned model folder), or the reference's "
                             f"--model_type {{{','.join(MODEL_TYPES)}}} with --base_model/--ckpt")
        return args.model, getattr(args, "lora", None) or args.lora_ckpt, "--model"
    if args.model is not None:
        raise UsageError(f"--model {args.model!r} and --model_type {args.model_type}: give one of them")
    needs = {"pretrain": ("base_model",), "pruneLLM": ("ckpt",), "tune_prune_LLM": ("ckpt", "lora_ckpt")}
    missing = [f"--{n}" for n in needs[args.model_type] if getattr(args, n) is None]
    if missing:
        raise UsageError(f"--model_type {args.model_type}: needs {' and '.join(missing)}")
    if args.model_type != "tune_prune_LLM" and args.lora_ckpt is not None:
        raise UsageError(f"--lora_ckpt {args.lora_ckpt!r}: only with --model_type tune_prune_LLM")
    if args.model_type == "pretrain":
        return args.base_model, None, "--base_model"
    return args.ckpt, args.lora_ckpt if args.model_type == "tune_prune_LLM" else None, "--ckpt"


def explain(err: BaseException, argv: Sequence[str]) -> tuple[int, str]:
    """``(exit status, one-line message)`` for an exception that escaped a script's ``main``."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, UsageError):
        return 2, text
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return 1, f"no space left on the device writing {err.filename or 'the output'}: the disk is full; " \
                  "free some space or choose an output folder on another disk"
    if isinstance(err, PermissionError):
        return 2, f"permission denied: {err.filename or text}; choose a path you can read/write"
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return 2, f"read-only file system: {err.filename}; choose an output folder you can write to"
    if isinstance(err, (OSError, RuntimeError)) and any(m in text for m in HUB_MARKERS):
        return 2, f"the Hugging Face Hub is unreachable ({text[:200]}); pass local paths instead " \
                  "(--base_model / --prune_model / --model FOLDER, --data_path FILE.json, --eval_data_dir / " \
                  "--data_dir ../shared/data)"
    if isinstance(err, MemoryError) or "out of memory" in text:
        return 1, f"out of memory ({text[:200]}); use a smaller model, batch size or sequence length"
    if isinstance(err, ImportError):
        return 1, text
    usage = isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError)) \
        and not isinstance(err, UnicodeError) or _raised_while_reading(err)
    if usage:
        return 2, _with_flag(text, argv)
    return 1, f"{type(err).__name__}: {text} (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"


def _raised_while_reading(err: BaseException) -> bool:
    names = {frame.name for frame in traceback.extract_tb(err.__traceback__)}
    return bool(names & INPUT_READERS) or "checkpoint" in type(err).__name__.lower() \
        or type(err).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError", "JSONDecodeError")


def _with_flag(text: str, argv: Sequence[str]) -> str:
    """Prefix the flag whose value the message quotes, when the message does not name a flag itself.

    ``--checkpoints base=a pruned=b+c`` quotes ``a``, ``b`` or ``c`` as well as the whole tokens.
    """
    if text.startswith("-"):
        return text
    flag = None
    for token in argv:
        if token.startswith("--"):
            flag, eq, inline = token.partition("=")
            if not eq:
                continue
            token = inline
        if flag is None:
            continue
        spec = token.partition("=")[2] if "=" in token else token
        if any(part and (_quotes(text, part) or _quotes(text, str(Path(part)))) for part in [token, *spec.split("+")]):
            return f"{flag} {token!r}: {text}"
    return text


def _quotes(text: str, value: str) -> bool:
    """Whether ``text`` holds ``value`` as a whole word: ``5`` is not in ``ernie4_5``, ``32`` not in ``float32``."""
    return re.search(rf"(?<![\w.]){re.escape(value)}(?![\w])", text) is not None


def run(main: Callable[[Sequence[str] | None], Any], prog: str, argv: Sequence[str] | None = None) -> NoReturn:
    """Call ``main(argv)`` and exit: 0, or one ``PROG: error: ...`` line and the status of ``explain``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = main(argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException as err:  # noqa: BLE001 - the one place that turns failures into a message
        if debug:
            traceback.print_exc()
        status, message = explain(err, argv)
        logging.getLogger(prog).debug("failed", exc_info=True)
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(status)
    sys.exit(result if isinstance(result, int) else 0)

