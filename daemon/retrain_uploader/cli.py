"""The ``retrain-uploader`` command. Exit codes: 0 ok, 1 a failure at run time, 2 bad configuration or usage."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, Settings, default_config_path, loose_permissions
from .history import DEFAULT_LISTING, job_document, job_story, job_table, parse_since
from .journal import stderr_is_journal
from .ledger import DAMAGED_EXIT_STATUS, Ledger, LedgerDamaged, LedgerLocked, LedgerUnreadable, State, iso, lock_held
from .logs import configure, escape_surrogates, run_main

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
# `run` on a damaged, truncated or newer-schema ledger: a restart cannot fix it (RestartPreventExitStatus= lists it).
EXIT_LEDGER = DAMAGED_EXIT_STATUS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrain-uploader", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $RETRAIN_UPLOADER_CONFIG, else /etc/retrain-uploader/config.toml)",
    )
    common.add_argument(
        "--log-level",
        default=os.environ.get("RETRAIN_UPLOADER_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="default: $RETRAIN_UPLOADER_LOG_LEVEL, else [logging] level from the config (run), else info",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="watch and check as in production, log dryrun.would_upload or the refusal; no API call, nothing moved,"
        " the ledger untouched",
    )
    pre = sub.add_parser("check", parents=[common], help="check files or pairs as the daemon would, before dropping")
    pre.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    pre.add_argument("--model", help="the model whose rules apply (default: the model whose inbox holds the file)")
    pre.add_argument("--json", action="store_true", help="one JSON object per input")
    _jobs_parser(sub, common)
    status = sub.add_parser("status", parents=[common], help="per model: counts, waiting files, pauses, errors")
    status_form = status.add_mutually_exclusive_group()
    status_form.add_argument("--json", action="store_true")
    status_form.add_argument(
        "--check",
        action="store_true",
        help="monitoring plugin: one line, exit 0 OK, 1 WARNING (a job failed in 24 h, a file waited longer than"
        " [status] alert_waiting_s), 2 CRITICAL (a model paused, no daemon running), 3 UNKNOWN",
    )
    retry = sub.add_parser("retry", parents=[common], help="put a failed job's files back into its inbox")
    retry.add_argument("id", type=int)
    switch = sub.add_parser("switch", parents=[common], help="publish the retrained model of an uploaded job")
    switch.add_argument("id", type=int)
    check = sub.add_parser("check-config", parents=[common], help="validate the config and the key sources")
    check.add_argument("--online", action="store_true", help="also prove each key against the API (creates no job)")
    emulator = sub.add_parser("emulator", parents=[common], help="a local stand-in of the Retrain API on 127.0.0.1")
    emulator.add_argument("--port", type=int, default=8787)
    emulator.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY[=MODEL_ID]",
        help="an API key the emulator accepts (repeatable; default demo-key=1)",
    )
    emulator.add_argument("--retrain-s", type=float, default=5.0, help="seconds from upload to job_finished")
    demo = sub.add_parser("demo", parents=[common], help="the daemon against the built-in emulator, with sample data")
    demo.add_argument("--once", action="store_true", help="exit 0 once every sample is uploaded")
    demo.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    return parser


def _jobs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser(
        "jobs", parents=[common], help="list jobs from the ledger (newest 50), or `jobs show ID`: one job's history"
    )
    jobs.add_argument("--state", choices=[s.value for s in State])
    jobs.add_argument("--model")
    jobs.add_argument("--json", action="store_true", help="one JSON object per line (every job, unless limited)")
    jobs.add_argument(
        "--since",
        type=_since,
        metavar="DURATION|DATE",
        help="only jobs created since then: 90m, 2h, 7d, 1w, or 2026-12-01[T10:00] (local time)",
    )
    jobs.add_argument(
        "--limit", type=_positive_int, metavar="N", help=f"the newest N jobs (default {DEFAULT_LISTING}; --json: all)"
    )
    # Options given after `show` must not reset those given before it: the sub-parser sets only what it is given.
    again = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    again.add_argument("--config", type=Path)
    again.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    again.add_argument("--json", action="store_true", help="one object: the job's fields and its `events`")
    show = jobs.add_subparsers(dest="jobs_command", metavar="show").add_parser(
        "show", parents=[again], help="one job and every event of it, in order"
    )
    show.add_argument("id", type=int)


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of jobs, 1 or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for out in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 (lone surrogates) must not crash a print
        if isinstance(out, io.TextIOWrapper):
            out.reconfigure(errors="backslashreplace")
    configure(level=args.log_level or "info")
    handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        _error("config.invalid", f"configuration error:\n{e}", error=str(e))
        return EXIT_CONFIG
    except LedgerUnreadable as e:
        _error("ledger.unreadable", str(e), error=str(e))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _error(event: str, text: str, **fields: Any) -> None:
    """A command's error: a line for the person at the terminal, or, when stderr is the journal (a unit's
    ExecReload= running check-config), a record at priority err that `journalctl -p err` shows."""
    if stderr_is_journal(sys.stderr):
        import structlog

        structlog.get_logger("retrain_uploader.cli").error(event, **fields)
    else:
        print(f"retrain-uploader: {text}", file=sys.stderr)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_toml(args.config or default_config_path())


def _cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from .service import Service

    # Under systemd these go to the journal like every other record (PRIORITY=3): `journalctl -p err` shows why the
    # service did not start.
    log = structlog.get_logger("retrain_uploader.cli")
    try:
        settings = _settings(args)
    except ConfigError as e:
        log.error("config.invalid", error=str(e), action="not started; fix the file (`retrain-uploader check-config`)")
        return EXIT_CONFIG
    if args.dry_run:
        from .preflight import dry_run

        configure(level=args.log_level or settings.logging.level)  # stderr only: dry-run writes no file
        return run_main(dry_run(settings))
    configure(level=args.log_level or settings.logging.level, file=settings.logging.file)
    _warn_permissions(settings)
    try:
        return run_main(Service(settings).run())
    except LedgerLocked as e:
        log.error("service.cannot_start", error=str(e))
        return EXIT_FAILURE
    except LedgerDamaged as e:
        log.error("ledger.damaged", error=str(e), action="not started; restarting will not help")
        return EXIT_LEDGER
    except OSError as e:  # the ledger folder, an inbox or the metrics port: say which, without a traceback
        where = f" ({e.filename})" if e.filename else ""
        log.error("service.cannot_start", error=f"cannot start: {e.strerror or e}{where}", path=e.filename)
        return EXIT_FAILURE


def _warn_permissions(settings: Settings) -> list[str]:
    import structlog

    log = structlog.get_logger("retrain_uploader.cli")
    loose = []
    paths = [settings.source] + [m.api_key_file for m in settings.models]
    for path in paths:
        if path is not None and loose_permissions(path):
            loose.append(str(path))
            log.warning("config.readable_by_others", path=str(path), fix=f"chmod o-rwx {path}")
    return loose


def _open_ledger(settings: Settings, *, read_only: bool = True) -> Ledger | None:
    """The ledger beside a running daemon: read-only for the commands that only look (`status`, `jobs`)."""
    if not settings.ledger.path.exists():
        return None
    return Ledger(settings.ledger.path, read_only=read_only)


def _emit(lines: Iterable[str]) -> None:
    """Print ``lines``; a reader that stopped reading (`jobs --json | head -1`) ends the output quietly."""
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # What the reader wanted it has. Point stdout at /dev/null so the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _cmd_jobs(args: argparse.Namespace) -> int:
    if args.jobs_command == "show":
        return _cmd_jobs_show(args)
    ledger = _open_ledger(_settings(args))
    if ledger is None:
        return EXIT_OK
    since = None if args.since is None else iso(args.since)
    with ledger:
        if args.json:  # every job unless limited, streamed from the ledger's cursor: constant memory at a million
            # Closed here, while the ledger is open, also when the reader stopped early (`jobs --json | head`).
            with contextlib.closing(ledger.stream(state=args.state, model=args.model, since=since,
                                                  limit=args.limit)) as jobs:
                _emit(escape_surrogates(json.dumps(job.as_dict(), ensure_ascii=False)) for job in jobs)
        else:
            limit = DEFAULT_LISTING if args.limit is None else args.limit
            shown, total = ledger.recent(state=args.state, model=args.model, since=since, limit=limit)
            _emit(job_table(shown, left_out=total - len(shown)))
    return EXIT_OK


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    ledger = _open_ledger(settings)
    if ledger is None:
        print(f"retrain-uploader: no ledger at {settings.ledger.path}", file=sys.stderr)
        return EXIT_FAILURE
    with ledger:
        try:
            job = ledger.get(args.id)
        except KeyError:
            print(f"retrain-uploader: no job {args.id} in the ledger", file=sys.stderr)
            return EXIT_FAILURE
        events = ledger.events(job.id)
    if args.json:
        _emit([escape_surrogates(json.dumps(job_document(job, events), ensure_ascii=False))])
    else:
        _emit(job_story(job, events))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from .admin import collect, render

    if args.check:
        return _status_check(args)
    settings = _settings(args)
    ledger = _open_ledger(settings)
    try:
        report = collect(settings, ledger)
    finally:
        if ledger is not None:
            ledger.close()
    _emit([escape_surrogates(json.dumps(report, ensure_ascii=False)) if args.json else render(report)])
    return EXIT_OK


def _status_check(args: argparse.Namespace) -> int:
    """`status --check`: a monitoring plugin. Whatever goes wrong is UNKNOWN (3), never a traceback: exit 1 would
    read as WARNING."""
    from .admin import collect, failed_recently, health, unknown

    try:
        settings = _settings(args)
        ledger = _open_ledger(settings)
        try:
            report = collect(settings, ledger)
            failed = failed_recently(ledger, time.time())
        finally:
            if ledger is not None:
                ledger.close()
        code, line = health(
            report, failed, lock_held=lock_held(settings.ledger.path), alert_waiting_s=settings.status.alert_waiting_s
        )
    except Exception as e:  # a plugin answers UNKNOWN whatever failed
        code, line = unknown(f"cannot check: {e}")
    _emit([escape_surrogates(line)])
    return code


def _on_job(args: argparse.Namespace, verb: str, action: Callable[[Settings, Ledger, int], list[str]]) -> int:
    """Run ``action`` on job ``args.id``; a missing ledger or job, or a refusal, is one clear line and exit 1."""
    settings = _settings(args)
    ledger = _open_ledger(settings, read_only=False)
    if ledger is None:
        print(f"retrain-uploader: no ledger at {settings.ledger.path}", file=sys.stderr)
        return EXIT_FAILURE
    with ledger:
        try:
            lines = action(settings, ledger, args.id)
        except KeyError:
            print(f"retrain-uploader: cannot {verb} job {args.id}: no job {args.id} in the ledger", file=sys.stderr)
            return EXIT_FAILURE
        except ValueError as e:
            print(f"retrain-uploader: cannot {verb} job {args.id}: {e}", file=sys.stderr)
            return EXIT_FAILURE
    for line in lines:
        print(line)
    return EXIT_OK


def _cmd_retry(args: argparse.Namespace) -> int:
    from .admin import retry_job

    return _on_job(args, "retry", retry_job)


def _cmd_switch(args: argparse.Namespace) -> int:
    from .admin import switch_job

    return _on_job(args, "switch", lambda s, ledger, i: [asyncio.run(switch_job(s, ledger, i))])


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .admin import check_keys_online

    settings = _settings(args)
    problems: list[str] = []
    for model in settings.models:
        try:
            model.read_api_key()
        except ConfigError as e:
            problems.append(str(e))
        if not model.inbox.is_dir() and not model.inbox.parent.is_dir():
            problems.append(f"models.{model.name}.inbox: {model.inbox} does not exist and neither does its parent")
    loose = _warn_permissions(settings)
    if not problems and args.online:
        problems += asyncio.run(check_keys_online(settings))
    for problem in problems:
        _error("config.invalid", problem, error=problem)
    if problems:
        return EXIT_CONFIG
    note = f" (warning: readable by others: {', '.join(loose)})" if loose else ""
    print(
        f"{settings.source}: OK, {len(settings.models)} model(s){' keys accepted by the API' if args.online else ''}"
        f"{note}"
    )
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 if every input passes, 1 if one is refused, 2 for a usage or config error."""
    from .preflight import check_paths

    path = args.config or default_config_path()
    settings = Settings.from_toml(path) if args.config is not None or path.exists() else None
    if args.model is not None and (settings is None or args.model not in {m.name for m in settings.models}):
        print(f"retrain-uploader: check: no model {args.model!r} in {path}", file=sys.stderr)
        return EXIT_CONFIG
    verdicts = check_paths(args.paths, settings, args.model)
    for v in verdicts:
        if args.json:
            print(json.dumps(v.as_dict(), ensure_ascii=False))
            continue
        print(f"{'OK     ' if v.ok else 'REFUSED'} {v.path}" + (f" -> {v.upload_filename}" if v.ok else ""))
        if v.reason:
            print(f"        {v.reason}")
        if v.what_to_do:
            print(f"        what to do: {v.what_to_do}")
        for warning in v.warnings:
            print(f"        warning: {warning}")
    return EXIT_OK if all(v.ok for v in verdicts) else EXIT_FAILURE


def _cmd_emulator(args: argparse.Namespace) -> int:
    from .emulator import run_forever

    keys: dict[str, int] = {}
    for item in args.key or ["demo-key=1"]:
        key, _, model_id = item.partition("=")
        keys[key] = int(model_id) if model_id else len(keys) + 1
    run_forever(args.port, keys, retrain_s=args.retrain_s)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_main(run_demo(once=args.once, workdir=args.dir))


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "jobs": _cmd_jobs,
    "status": _cmd_status,
    "retry": _cmd_retry,
    "switch": _cmd_switch,
    "check-config": _cmd_check_config,
    "check": _cmd_check,
    "emulator": _cmd_emulator,
    "demo": _cmd_demo,
}

if __name__ == "__main__":
    raise SystemExit(main())
