"""Every command of the README's "Operating it" block runs as written, from a fresh checkout's layout.

The commands run in order through bash in a temporary working directory that holds only what a fresh clone has
(`data/`) plus `.venv`, with MLSIGNAL_DATABASE_URL and MLSIGNAL_MODEL_DIR pointing into it. The two long-running
server lines (`mlsignal-training &`, `mlsignal-inference &`) are replaced by servers this test starts on free ports,
which the commands reach through MLSIGNAL_TRAINING_ADDR / MLSIGNAL_INFERENCE_ADDR. `JOB_ID` is the job the README's
`train` command ran. The quick-start's `make` targets are checked to exist (running them is what `make` itself does).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def shell_blocks(text: str) -> list[list[str]]:
    """The ```sh blocks of `text`, as commands (continuation lines joined)."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        commands: list[str] = []
        pending = ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command:
                commands.append(command)
        blocks.append(commands)
    return blocks


def test_quick_start_make_targets_exist():
    quick = README.read_text().split("\n## ", 1)[0]
    targets = [c.split("#")[0].split() for block in shell_blocks(quick) for c in block]
    makefile = (REPO / "Makefile").read_text()
    assert targets, "the quick start shows no command"
    for words in targets:
        assert words[0] == "make" and len(words) == 2, words
        assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), f"no make target {words[1]}"


@pytest.mark.skipif(not (VENV_BIN / "mlsignal").exists(), reason="needs the project's .venv (make venv)")
def test_operating_it_commands_run_as_written(tmp_path):
    from inference_service.server import start as start_inference
    from shared.settings import Settings
    from training_service.server import start as start_training

    operating = section(README.read_text(), "Operating it").split("\n### ", 1)[0]  # compose: test_compose.py
    commands = [c for block in shell_blocks(operating) for c in block]
    assert any("mlsignal-training &" in c for c in commands) and any("mlsignal train " in c for c in commands)

    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(REPO / ".venv")
    (work / "data").symlink_to(REPO / "data")
    url = f"sqlite:///{work}/var/mlsignal.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    env.update({"MLSIGNAL_DATABASE_URL": url, "MLSIGNAL_MODEL_DIR": str(work / "var" / "models")})
    settings = Settings(database_url=url, model_dir=work / "var" / "models", model_poll_seconds=0.2)

    servers: list = []
    job_id = ""
    t0 = time.monotonic()
    try:
        for command in commands:
            if command.split("#")[0].strip().endswith("&"):  # a long-running server: this test runs its own
                program = command.split()[0].rsplit("/", 1)[-1]
                start, var = {"mlsignal-training": (start_training, "MLSIGNAL_TRAINING_ADDR"),
                              "mlsignal-inference": (start_inference, "MLSIGNAL_INFERENCE_ADDR")}[program]
                running = start(settings, "127.0.0.1:0")
                servers.append(running)
                env[var] = f"127.0.0.1:{running.port}"
                continue
            expected = (0,)
            if "JOB_ID" in command:
                assert job_id, "JOB_ID is used before a job was trained"
                command = command.replace("JOB_ID", job_id)
                expected = (0, 2)  # the job has finished by now: FAILED_PRECONDITION, exit 2 (as documented)
            started = time.monotonic()
            result = subprocess.run(["bash", "-c", command], cwd=work, env=env, text=True, capture_output=True,
                                    timeout=120)
            print(f"{time.monotonic() - started:5.1f}s  {command}")
            assert result.returncode in expected, f"{command}\nexit {result.returncode}\n{result.stderr}"
            if result.returncode == 2:
                assert "FAILED_PRECONDITION" in result.stderr, result.stderr
            found = re.search(r"^job\s+([0-9a-f-]{8,})$", result.stdout, flags=re.M)
            if " train " in f" {command} " and found:
                job_id = found.group(1)
    finally:
        for running in reversed(servers):
            running.stop(0.5)
    assert job_id
    assert (work / "var" / "signals.csv").exists() and (work / "var" / "with_signals.csv").exists()
    assert time.monotonic() - t0 < 120
