"""``linfusion bench vae``: bad lists and counts are one-line errors before anything is measured."""

from __future__ import annotations

import pytest

from linfusion.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "abc"], "--sizes 'abc': expected comma-separated sides"),
        (["--sizes", "0"], "--sizes '0': each side must be a positive multiple of 8"),
        (["--sizes", "256,100"], "each side must be a positive multiple of 8"),
        (["--policies", "full"], "the policies must start with plain"),
        (["--policies", "plain,bogus"], "unknown store policy ['bogus']"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_lists_and_counts_are_one_line_errors(
    capsys: pytest.CaptureFixture, tmp_path, argv: list[str], message: str
) -> None:
    assert main(["bench", "vae", "--out", str(tmp_path / "result"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and list(tmp_path.iterdir()) == []
