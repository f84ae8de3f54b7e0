"""The command line as a pipeline tool: how targets are given, ``targets list``,
``export --dry-run``, ``--json`` documents (errors included), one-line usage errors, shell
completion, ``-v`` and a light ``--version``. Most run ``main`` in-process against a served
emulator; what needs a real process (the console script, imports) runs one."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from breadasync import cli
from breadasync.emulator import Emulator, TargetPlan

SCRIPT = Path(sys.executable).with_name("breadasync")


@pytest.fixture
def service(bread_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """The emulator as the CLI's service, through the environment."""
    monkeypatch.setenv("BREAD_API_KEY", bread_emulator.api_key)
    monkeypatch.setenv("BREAD_BASE_URL", bread_emulator.url or "")
    return bread_emulator


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``main`` in-process: its exit code, stdout and stderr."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def document(out: str) -> Any:
    """stdout as exactly one JSON document (orjson refuses anything after it)."""
    return orjson.loads(out)


# --- targets, the same way everywhere --------------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
def test_every_command_takes_targets_the_same_way(
    service: Emulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name in ("a", "b", "c"):
        service.add_target("r", name, rows=30, rollout="complete")
    listed = tmp_path / "targets.txt"
    listed.write_text("# the nightly set\nb\n\n  c  \n# a is done\n")

    def names(*argv: str) -> list[str]:
        code, out, err = call(capsys, *argv, "--json")
        assert code == 0, err
        return [t["target"] for t in document(out)["targets"]]

    assert names("status", "--repo", "r", "a", "b") == ["a", "b"]
    assert names("status", "--repo", "r", "--targets-from", str(listed)) == ["b", "c"]
    assert names("status", "--repo", "r", "a", "--targets-from", str(listed), "b") == [
        "a",
        "b",
        "c",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("c\na\n"))
    assert names("status", "--repo", "r", "--targets-from", "-") == ["c", "a"]
    assert sorted(names("status", "--repo", "r", "--all")) == ["a", "b", "c"]
    assert sorted(names("rollout", "--repo", "r", "--all", "--no-wait")) == ["a", "b", "c"]
    exported = names("export", "--repo", "r", "a", "--target", "b", "--out", str(tmp_path / "out"))
    assert sorted(exported) == ["a", "b"]  # positional and --target together
    assert sorted(p.name for p in (tmp_path / "out" / "repo=r").iterdir()) == [
        "target=a",
        "target=b",
    ]
    everything = names("export", "--repo", "r", "--all", "--out", str(tmp_path / "all"))
    assert sorted(everything) == ["a", "b", "c"]

    for argv, message in [
        (["status", "--repo", "r"], "no targets: give TARGET names, --targets-from FILE"),
        (["status", "--repo", "r", "--all", "a"], "--all takes every target of the repo"),
        (
            ["rollout", "--repo", "r", "--targets-from", str(tmp_path / "missing.txt")],
            "cannot read targets from",
        ),
    ]:
        code, out, err = call(capsys, *argv)
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1, err
        assert message in err


@pytest.mark.bread_emulator(speed=0)
def test_targets_list_as_a_table_as_json_and_as_lines_for_a_pipe(
    service: Emulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name in ("x1", "x2"):
        service.add_target("r", name, rows=10, rollout="complete")
    code, out, _ = call(capsys, "targets", "list", "--repo", "r")
    assert code == 0
    assert "r" in out
    assert "x1" in out
    assert "2 target(s) in r" in out
    code, out, _ = call(capsys, "targets", "list", "--repo", "r", "--json")
    assert code == 0
    assert document(out) == {"repo": "r", "count": 2, "targets": ["x1", "x2"]}
    code, lines, _ = call(capsys, "targets", "list", "--repo", "r", "-q")
    assert code == 0
    assert lines == "x1\nx2\n"
    # The lines feed another command through stdin.
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = call(
        capsys, "export", "--repo", "r", "--targets-from", "-", "--out", str(tmp_path), "--json"
    )
    assert code == 0, err
    assert document(out)["rows"] == 20
    code, out, _ = call(capsys, "targets", "list", "--repo", "nope", "--json")
    assert code == 1
    assert document(out)["error"]["type"] == "NotFoundError"


# --- export --dry-run ----------------------------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
def test_dry_run_prints_the_plan_and_fetches_one_sample_page(
    service: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    service.add_target("r", "a", rows=2500, rollout="complete")
    service.add_target("r", "b", rows=1000, rollout="complete")
    service.add_target("r", "running", rows=100, rollout="running")
    out = tmp_path / "out"
    argv = ["export", "--repo", "r", "a", "b", "--out", str(out), "--dry-run"]
    argv += ["--rows-per-part", "1000", "--page-size", "300"]
    code, text, err = call(capsys, *argv, "--json")
    assert code == 0, err
    plan = document(text)
    # a: parts of 1000, 1000, 500 rows -> 4 + 4 + 2 pages of 300; b: one part, 4 pages.
    assert [(t["target"], t["lines"], t["parts"], t["pages"]) for t in plan["targets"]] == [
        ("a", 2500, 3, 10),
        ("b", 1000, 1, 4),
    ]
    assert (plan["lines"], plan["parts"], plan["pages"]) == (3500, 4, 14)
    assert plan["sample"]["target"] == "a"
    assert plan["sample"]["rows"] == 100
    per_row = plan["sample"]["parquet_bytes_per_row"]
    assert per_row > 0
    assert plan["estimated_bytes"] == round(2500 * per_row) + round(1000 * per_row)
    assert service.stats.count("get_rollout_output") == 1  # the sample, nothing else
    assert not out.exists()  # nothing written, not even the folder

    code, text, err = call(capsys, *argv)
    assert code == 0, err
    assert "dry run: 2 of 2 target(s) would export 3,500 rows in 4 part(s) from 14 page" in text
    assert "nothing was exported" in text

    # With b exported already, its part is kept and its pages are not fetched again.
    assert (
        call(capsys, "export", "--repo", "r", "b", "--out", str(out), "--rows-per-part", "1000")[0]
        == 0
    )
    code, text, err = call(capsys, *argv, "--json")
    assert code == 0, err
    again = document(text)
    assert [(t["target"], t["parts_committed"], t["pages_to_fetch"]) for t in again["targets"]] == [
        ("a", 0, 10),
        ("b", 1, 0),
    ]
    assert (again["parts_committed"], again["pages_to_fetch"]) == (1, 10)
    code, text, err = call(capsys, *argv, "--no-resume", "--json")
    assert document(text)["pages_to_fetch"] == 14  # --no-resume refetches everything
    shutil.rmtree(out)

    code, text, _ = call(capsys, "export", "--repo", "r", "running", "ghost", "--out", str(out),
                         "--dry-run", "--json")  # fmt: skip
    assert code == 1  # a target that would not export is a failure, as the export would be
    entries = {t["target"]: t for t in document(text)["targets"]}
    assert entries["running"]["would_export"] is False
    assert "--allow-partial" in entries["running"]["error"]
    assert "404" in entries["ghost"]["error"]
    assert not out.exists()


# --- --json: always one document -------------------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
def test_json_is_one_document_even_for_errors(
    service: Emulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    service.add_target("r", "t", rows=10, rollout="complete")
    out = str(tmp_path / "out")
    monkeypatch.setenv("BREAD_API_KEY", "not-the-key")  # every request: 401
    for argv in (
        ["export", "--repo", "r", "t", "--out", out],
        ["status", "--repo", "r", "t"],
        ["rollout", "--repo", "r", "t", "--no-wait"],
    ):
        code, text, err = call(capsys, *argv, "--json")
        assert code == 1, argv
        (target,) = document(text)["targets"]
        assert "401" in target["error"], argv
    for argv, code_wanted, kind in (
        (["targets", "list", "--repo", "r"], 1, "AuthenticationError"),
        (["status", "--repo", "r", "--all"], 1, "AuthenticationError"),
        (["export", "--repo", "r", "t", "--out", out, "--page-size", "5000"], 2, "usage"),
        (["export", "--repo", "r", "t", "--out", out, "--base-url", "x.example"], 2, "ConfigError"),
    ):
        code, text, err = call(capsys, *argv, "--json")
        assert code == code_wanted, (argv, err)
        found = document(text)
        assert found["ok"] is False
        assert found["exit_code"] == code_wanted
        assert found["error"]["type"] == kind
        assert err.count("\n") == 1, err  # and one line for a person on stderr
    # Without --json, a single target's error is the command's: one line, nothing on stdout.
    code, text, err = call(capsys, "export", "--repo", "r", "t", "--out", out)
    assert (code, text) == (1, "")
    assert err.startswith("breadasync export: error: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--repo", "r", "t", "--out", "o", "--page-size", "5000"], "not within 1..1000"),
        (["export", "--repo", "r", "t", "--out", "o", "--pages", "5"], "unrecognized argument"),
        (["export", "--repo", "r", "t", "--out", "o", "--page", "5"], "unrecognized argument"),
        (["status", "t"], "the following arguments are required: --repo"),
        (["rollout", "--repo", "r", "t", "--timeout", "-1"], "must be >= 0"),
        (["nonsense"], "invalid choice"),
        (["targets"], "required: ACTION"),
        ([], "required: COMMAND"),
        (["emulator", "--dialect", "yaml"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("breadasync")
    assert ": error: " in err
    assert message in err
    assert "usage:" not in err


def test_every_parser_refuses_abbreviations() -> None:
    from breadasync.cli._args import build_parser

    parser, by_name = build_parser()
    for each in [parser, *by_name.values()]:
        assert each.allow_abbrev is False, each.prog


# --- completion ----------------------------------------------------------------------------


def test_completion_scripts_for_bash_and_zsh(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for shell in ("bash", "zsh"):
        code, script, err = call(capsys, "completion", shell)
        assert code == 0, err
        for word in ("breadasync", "export", "--targets-from", "--dry-run", "targets"):
            assert word in script, (shell, word)
        (tmp_path / f"breadasync.{shell}").write_text(script)
    bash = shutil.which("bash")
    assert bash is not None
    checked = subprocess.run(
        [bash, "-n", str(tmp_path / "breadasync.bash")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_completion_without_shtab_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "shtab", None)  # import shtab -> ImportError
    code, out, err = call(capsys, "completion", "bash")
    assert code == 2
    assert out == ""
    assert err == (
        "breadasync completion: error: shell completion needs shtab: "
        "pip install 'breadasync[cli]'\n"
    )


# --- -v and --version ----------------------------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
def test_verbose_logs_requests_without_asyncio_noise(bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", plan=TargetPlan(stimuli=3), rollout="complete")
    env = {
        "BREAD_API_KEY": bread_emulator.api_key,
        "BREAD_BASE_URL": bread_emulator.url or "",
        "PYTHONASYNCIODEBUG": "1",  # asyncio at its chattiest: still none of it shown
        "PATH": "/usr/bin:/bin",
    }
    for flags in (["-v"], ["-vv"]):
        done = subprocess.run(
            [str(SCRIPT), "status", "--repo", "r", "t", *flags],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # One record per request on the breadasync logger: method, path and status at least
        # (the transport decides the rest of the wording).
        for path in ("/v1/repo/r/targets/t/stim", "/v1/repo/r/targets/t/rollout"):
            assert re.search(rf" breadasync [A-Z]+ .*GET {path}\b.*\b200\b", done.stderr), path
        assert " asyncio " not in done.stderr
        assert "Using selector" not in done.stderr
        assert bread_emulator.api_key not in done.stderr + done.stdout
    quiet = subprocess.run(
        [str(SCRIPT), "status", "--repo", "r", "t"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert quiet.stderr == ""


HEAVY = ("pyarrow", "rich", "aiohttp", "breadasync.cli._output", "breadasync.cli._commands")


def test_version_and_usage_errors_load_nothing_heavy() -> None:
    """``--version`` and a usage error run only the parser: whatever ``import breadasync``
    itself loads (the library's business), the CLI adds none of the heavy modules."""
    code = (
        "import sys\n"
        "import breadasync\n"
        f"heavy = {HEAVY!r}\n"
        "def loaded():\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy)\n"
        "before = set(loaded())\n"
        "from breadasync.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "assert main(['export', '--page-size', '0']) == 2\n"
        "print(sorted(set(loaded()) - before))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("breadasync ")
    assert done.stdout.splitlines()[-1] == "[]"


def test_readme_synopsis_matches_the_parser() -> None:
    from breadasync.cli._args import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The command line")[1].split("\n## ")[0]
    synopsis = re.search(r"```sh\n(.+?)```", section, re.DOTALL)
    assert synopsis is not None
    _, by_name = build_parser()
    command = ""
    seen = set()
    for line in synopsis.group(1).splitlines():
        line = line.split("#")[0]
        words = line.split()
        if words and words[0] == "breadasync":
            command = words[1] + (" list" if words[1] == "targets" else "")
            seen.add(command)
        known = {s for action in by_name[command]._actions for s in action.option_strings}
        for option in re.findall(r"--[a-z][a-z-]*", line):
            assert option in known, (command, option)
    assert seen == set(cli.COMMANDS)


def test_an_unforeseen_error_is_one_scrubbed_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-unforeseen-0123456789"

    async def broken(args: object, ui: object) -> int:
        raise RecursionError(f"deep inside, near {key}")

    monkeypatch.setitem(cli.COMMANDS, "status", broken)
    argv = ["status", "--repo", "r", "t", "--api-key", key]
    code, out, err = call(capsys, *argv)
    assert (code, out) == (1, "")
    assert err == (
        "breadasync status: error: unexpected RecursionError: deep inside, near *** "
        "(run with -v for the traceback)\n"
    )
    code, out, err = call(capsys, *argv, "-v", "--json")
    assert code == 1
    assert document(out)["error"]["type"] == "RecursionError"
    assert "Traceback (most recent call last)" in err
    assert key not in out + err
