"""`owl-train` (or `python train.py`): train mPLUG-Owl from a config file.

    owl-train [--config configs/<name>.py] [--config.<field>=<value> ...] [--huge_pages]

Without `--config` it runs the embedded default (`configs/default.py`): a small model trained through both
stages on generated data, ending with the held-out accuracy table. Every process of a multi-host run
(TPU pod slice, GPU cluster) runs the same command; see the README.

A mistake in the command line or the config (an unknown field, a value of the wrong type or out of range, a
config file that fails) ends the process before any work with one line on stderr and exit status 2; a loss
that stops being finite ends it with one line and status 1, before that stage's model is written.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training configuration file.", lock_config=True)
_HUGE_PAGES = flags.DEFINE_bool(
    "huge_pages",
    False,
    "CPU backend only: run again with glibc's malloc on transparent huge pages, which cuts page faults of "
    "the step's temporaries (measured faster with scanned layers; see owl_jax/cli/host_memory.py).",
)


def _fail(message: str, status: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


def run_training(config: Any, train: Callable[[ConfigDict], Any] | None = None) -> None:
    """Check `config`, then train it with `train` (default `owl_jax.training.run.run`).

    A mistake in the config, missing data, too many unusable records or checkpoints of which none is
    intact exit with status 2, and a
    non-finite loss with status 1, each after one line on stderr; the config is checked before JAX loads,
    so a mistake costs no start-up.
    """
    from owl_jax.config import ConfigError
    from owl_jax.training.validation import validate

    try:
        if train is None and config.get("aot") is not None and config.aot.get("topology"):
            # checked by owl_jax.aot once `aot.model` has replaced the weights the config would read
            train = _compile_for_target
        else:
            validate(config)
        if train is None:
            logging.set_verbosity(logging.WARNING)  # Orbax reports every save step at INFO
            from owl_jax.training.run import run as train
        train(config)
    except ConfigError as e:
        _fail(str(e), 2)
    except (FileNotFoundError, RuntimeError) as e:
        from owl_jax.training.checkpoints import NoIntactCheckpoint
        from owl_jax.training.loop import NonFiniteLossError, SkippedRecordsError

        if isinstance(e, NonFiniteLossError):
            _fail(str(e), 1)
        # data missing or too much of it unusable; checkpoints that exist but none intact
        if isinstance(e, (FileNotFoundError, SkippedRecordsError, NoIntactCheckpoint)):
            _fail(str(e), 2)
        raise


def _compile_for_target(config: ConfigDict) -> None:
    """`--config.aot.topology=v5p-256`: compile the run's steps for that TPU target and report, instead of
    training (`owl_jax.aot`); a mistake exits with one line and status 2, a compiler failure with status 1."""
    from owl_jax.aot.train_plan import use_cpu_host

    use_cpu_host()  # before JAX starts
    from owl_jax.aot.cli import UsageError, run
    from owl_jax.aot.targets import TargetError
    from owl_jax.aot.train_plan import CompileError
    from owl_jax.sharding import ShardingError

    aot = config.aot
    try:
        run(
            config,
            target=aot.topology,
            model=aot.model,
            per_chip_batch=aot.per_chip_batch,
            search=aot.search,
            save=aot.save,
            json_path=aot.json,
        )
    except (UsageError, ShardingError, TargetError) as e:
        _fail(str(e), 2)
    except CompileError as e:  # the TPU compiler refused the step for another reason than its HBM
        _fail(str(e), 1)


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    config = _CONFIG.value
    if not isinstance(config, ConfigDict):  # ml_collections defers a config file that cannot be read
        path = _config_file(sys.argv)
        if not os.path.isfile(path):
            _fail(f"config file {path} does not exist", 2)
        _fail(f"config file {path}: get_config() must return a ConfigDict, not {type(config).__name__}", 2)
    if _HUGE_PAGES.value:
        from owl_jax.cli.host_memory import reexec_with_huge_pages

        note = reexec_with_huge_pages()  # returns only where it does not apply, or in the re-run process
        if note:
            print(f"--huge_pages: not applied: {note}", file=sys.stderr)
    run_training(config)


# -- the command line --------------------------------------------------------------------------------
def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake reported in one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl's flag errors, and what ml_collections or the config file itself raise
        _fail(_flag_error(e, argv), 2)


def _config_argument(argv: list[str]) -> str:
    """The `--config` value on the command line (`path` or `path:argument`), else the default file."""
    for i, arg in enumerate(argv[1:], 1):
        if re.match(r"^--?config=", arg):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return _DEFAULT_CONFIG


def _config_file(argv: list[str]) -> str:
    return _config_argument(argv).split(":", 1)[0]


def _overrides(argv: list[str]) -> dict[str, str | None]:
    """`{field path: value}` of the `--config.<field>=<value>` arguments (value None when given apart)."""
    found = (re.match(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", arg) for arg in argv[1:])
    return {m.group(1): m.group(2) for m in found if m}


def _load(argument: str) -> Any:
    """What `get_config()` of `--config=argument` returns, loaded again as ml_collections does; None if it
    fails."""
    path, *args = argument.split(":", 1)
    try:
        spec = importlib.util.spec_from_file_location("owl_train_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(*args)
    except Exception:
        return None
    return config


def _flag_error(error: Exception, argv: list[str]) -> str:
    """One line saying what is wrong with the command line or the config file it names."""
    path = _config_file(argv)
    if not os.path.isfile(path):
        return f"config file {path} does not exist"
    target, chain = os.path.realpath(path), [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for e in chain:  # the outermost exception raised through the config file's own code
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.realpath(f.filename) == target]
        if lines:
            return f"{path}, line {lines[-1]}: {type(e).__name__}: {_plain(e)}"
    overrides = _overrides(argv)
    config = _load(_config_argument(argv)) if overrides else None
    if overrides and config is not None and not isinstance(config, ConfigDict):
        return f"config file {path}: get_config() must return a ConfigDict, not {type(config).__name__}"
    if isinstance(config, ConfigDict):
        from owl_jax.training.validation import unknown_field_message

        for field, value in overrides.items():
            message = unknown_field_message(config, field)
            if message:
                return message
            current = _field(config, field)
            kinds = {bool: "True or False", int: "an int", float: "a number", str: "a string", tuple: "a tuple"}
            if value is not None and f"--config.{field}={value}:" in str(error) and type(current) in kinds:
                return f"config field {field} takes {kinds[type(current)]}, not {value!r}"
    return str(error)


def _plain(error: Exception) -> str:
    """The message of `error`, unquoted where ml_collections wraps one error's repr in another."""
    message = str(error)
    for _ in range(2):
        try:
            value = ast.literal_eval(message)
        except Exception:  # not a literal
            break
        message = value if isinstance(value, str) else message
    return message


def _field(config: ConfigDict, path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


def main() -> None:
    """Parse the command line (absl flags, `--config.<field>` overrides) and train; exits with the status."""
    # absl's --help shows the docstring and key flags of the script that was run: for the `owl-train` and
    # `train.py` wrappers, this module's.
    for name in ("config", "huge_pages"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    main_module = sys.modules["__main__"]
    if not main_module.__doc__:
        main_module.__doc__ = __doc__
    app.run(_train, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
