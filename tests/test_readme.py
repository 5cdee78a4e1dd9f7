"""The README's offline example runs as written (its own assertion checks unmount)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_offline_example_runs(capsys) -> None:
    text = README.read_text()
    match = re.search(r"<!-- readme-example: offline -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its offline example"
    exec(compile(match.group(1), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    found = re.fullmatch(r"7 layers replaced; max change (\d+\.\d{3})", printed.strip())
    assert found, printed
    assert float(found.group(1)) > 0.001  # LinFusion really changed the image


def test_readme_leads_with_the_demo_and_test_commands_and_the_picture() -> None:
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.index("make demo") < first_block.index("make test")
    picture = re.search(r'<img src="([^"]+)"', text).group(1)
    assert text.index(picture) < text.index("## Use")
    assert (README.parent / picture).stat().st_size > 0
    makefile = (README.parent / "Makefile").read_text().replace("\\\n", " ")
    demo = re.search(r"^demo: venv\n\t(.*linfusion generate .*)$", makefile, re.M)
    assert demo, "make demo lost its linfusion generate command"
    for option in ("--mode sdedit", "--size 512x512", "--out outputs/demo-512.png"):
        assert option in demo.group(1)
