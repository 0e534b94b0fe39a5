"""``lossaudit history MODEL --transformers V1,V2,...``: one audit over many releases, each in
its cached isolated environment (the installed release in the current one), as a table.

Exit status: 0 no finding on any release; 1 a finding on some release; 2 bad usage; 3 an
environment that cannot be built (the other releases are still audited and tabled).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from packaging.version import InvalidVersion, Version

from ...releases.check_runs import Side, run_check, validate
from ...report.environment import _version
from ...releases.environments import Spec, current_distributions, default_cache, ensure, parse_pin, source_directory
from ...core.errors import LossauditError, UsageError
from .check import check_out
from .upgrade import add_common_arguments, parse_own, slug

HELP = "audit MODEL on several transformers releases (isolated, cached environments): a table"


def _releases(text: str) -> tuple[str, ...]:
    """Releases as PyPI names them: ``5.25`` is 5.25.0 (one release, one environment, one row)."""
    versions = []
    for v in (v.strip() for v in text.split(",") if v.strip()):
        try:
            parse_pin(f"transformers=={v}")
            versions.append(release_name(v))
        except (UsageError, InvalidVersion):
            raise argparse.ArgumentTypeError(f"expected releases like 4.46.0,5.25.0, got {text!r}") from None
    return tuple(versions)


def release_name(text: str) -> str:
    """PEP 440's normal form, a final release with three parts: ``5.25`` -> ``5.25.0``,
    ``v4.46.0`` -> ``4.46.0``; ``4.46.0rc1`` stays."""
    version = Version(text)
    if version.pre or version.post or version.dev or version.local or len(version.release) >= 3:
        return str(version)
    return ".".join(str(part) for part in (*version.release, 0, 0)[:3])


def add_own_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transformers", dest="releases", type=_releases, metavar="V1,V2,...",
                   help="transformers releases to audit, e.g. 4.46.0,5.25.0")
    add_common_arguments(p, "history-MODEL")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="as for check")
    add_own_arguments(p)
    p.add_argument("check_args", nargs=argparse.REMAINDER, metavar="CHECK-OPTIONS",
                   help="check's options (--path, --microbatches, ...), passed to every audit as given")


def run(args: argparse.Namespace) -> int:
    from ...releases.history_table import History, write_history

    forwarded = parse_own(args, add_own_arguments)
    releases = list(dict.fromkeys(args.releases or ()))
    if not releases:
        raise UsageError("--transformers: name the releases to audit, e.g. --transformers 4.46.0,5.25.0")
    validate(args.model, forwarded)
    out = args.out or Path("reports") / slug(f"history-{Path(args.model).name}")
    check_out(out, args.overwrite, "history.json")
    cache, base, source = args.env_cache or default_cache(), current_distributions(), source_directory()
    command = shlex.join(["python", "-m", "lossaudit", "history", args.model, "--transformers", ",".join(releases),
                          *forwarded])
    history = History(args.model, command)
    started = time.monotonic()
    for release in releases:
        history.add(release, *_audit_release(release, args.model, forwarded, out, cache, base, source,
                                             args.allow_flavour_change))
    history.wall_s = round(time.monotonic() - started, 1)
    written = write_history(history, out)
    print(history.markdown_table())
    print(f"history: {out}/ ({', '.join(p.name for p in written)}) in {history.wall_s:.0f} s")
    failed = [f"{r['release']} ({r['cause']})" for r in history.rows if r["path"] == "-"]
    if failed:  # exit 3 says so in one line, after the table of the releases that ran
        print(f"lossaudit: error: {len(failed)} release(s) could not be audited: {'; '.join(failed)}"[:1000],
              file=sys.stderr)
    return history.exit_status


def _audit_release(release, model, forwarded, out, cache, base, source, allow_flavour_change):
    """(side, exit status or None, problem or None) of one release."""
    installed = _version("transformers")
    here = installed is not None and release == release_name(installed)
    label = f"transformers {release}" + (" (the current environment)" if here else "")
    try:
        spec = Spec.make({"transformers": release}, base, source, flavour_change=allow_flavour_change)
        env = None if here else ensure(spec, cache, _say)
        side = Side(label, out / f"transformers-{release}", env)
        if env is not None:
            how = f"built in {env.manifest.get('seconds', 0):.0f} s" if env.created else "cached"
            _say(f"environment for transformers=={release}: {env.path} ({how})")
        return side, run_check(side, model, forwarded, _say), None
    except LossauditError as exc:
        if exc.exit_status == 2:  # the user's options: every release would fail the same way
            raise
        _say(f"transformers {release}: {exc}")
        return Side(label, out / f"transformers-{release}"), None, " ".join(str(exc).split())


def _say(line: str) -> None:
    print(f"lossaudit history: {line}", file=sys.stderr, flush=True)
