"""The sync sender is generated from the async one (scripts/unasync.py): a stale generated
file, or an async name the substitution table does not know, fails the suite as it fails CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "unasync.py"


def test_the_generated_sync_sender_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def unasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module, pointed at a source and target in ``tmp_path``."""
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "FILES", [(tmp_path / "_async.py", tmp_path / "_sync.py")])
    return module


def test_check_fails_when_the_generated_file_is_stale(unasync: ModuleType, tmp_path: Path) -> None:
    source, target = tmp_path / "_async.py", tmp_path / "_sync.py"
    source.write_text('"""Doc."""\n\nasync def f(s: AsyncSender) -> None:\n    await s.aclose()\n')
    assert unasync.main(["--check"]) == 1 and not target.exists()
    assert unasync.main([]) == 0
    assert target.read_text().endswith('"""\n\ndef f(s: Sender) -> None:\n    s.close()\n')
    assert unasync.main(["--check"]) == 0
    source.write_text(source.read_text() + "\n\nasync def g() -> None:\n    pass\n")
    assert unasync.main(["--check"]) == 1


def test_an_async_name_without_a_substitution_is_an_error(
    unasync: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "_async.py").write_text('"""Doc."""\n\nasync def f(s: AsyncThing) -> None:\n    pass\n')
    assert unasync.main([]) == 2
    assert "'AsyncThing' has no substitution" in capsys.readouterr().err
    assert not (tmp_path / "_sync.py").exists()
