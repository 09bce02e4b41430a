"""Running the CLI in-process from tests, and the one-line error contract every bad input must keep."""
from __future__ import annotations

import sys

from vitshrink.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``vitshrink ARGS`` in-process; return (exit code, stdout, stderr)."""
    old_argv = sys.argv
    sys.argv = ["vitshrink", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one ``error: ...`` line on stderr holding every needle, no traceback."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
