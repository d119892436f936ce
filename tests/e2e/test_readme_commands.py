"""Every command of the README's "First hour" section and "Operating it" block runs as written, from a fresh
checkout's layout.

The commands run in order through bash in a temporary working directory that holds only what a fresh clone has
(`data/`) plus `.venv`, with MLSIGNAL_DATABASE_URL and MLSIGNAL_MODEL_DIR pointing into it. The two long-running
server lines (`mlsignal-training &`, `mlsignal-inference &`) are replaced by servers this test starts on free ports,
which the commands reach through MLSIGNAL_TRAINING_ADDR / MLSIGNAL_INFERENCE_ADDR. `JOB_ID` is the job the README's
`train` command ran. The quick-start's `make` targets are checked to exist (running them is what `make` itself does).

In "First hour", `make demo` is the one command not run here (tests/e2e/test_demo.py runs the demo): the state it
leaves, the bundled sample imported and one SERVING BTC/USD 1h model, is made instead by importing the sample and
training one model once the services are up. `MODEL_ID` is the model the section's `train` printed, `kill %1 %2`
stops the test's servers, and the ```python block runs with .venv's Python once the services answer.
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
    """The ```sh blocks of `text`, as commands (continuation lines joined); a ```python block as one command
    `python:<code>`."""
    blocks = []
    for lang, body in re.findall(r"```(sh|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            blocks.append([f"python:{body}"])
            continue
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
    first_hour = shell_blocks(section(README.read_text(), "First hour"))
    assert first_hour[0] == ["make demo"], first_hour[0]
    targets = [c.split("#")[0].split() for block in shell_blocks(quick) for c in block]
    makefile = (REPO / "Makefile").read_text()
    assert targets, "the quick start shows no command"
    for words in targets:
        assert words[0] == "make" and len(words) == 2, words
        assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), f"no make target {words[1]}"


class Clone:
    """A temporary directory laid out as a fresh clone (data/ and .venv), its environment, and the services that
    the README's `&` lines start (started here on free ports instead)."""

    def __init__(self, tmp_path: Path):
        from shared.settings import Settings

        self.work = tmp_path / "clone"
        self.work.mkdir()
        (self.work / ".venv").symlink_to(REPO / ".venv")
        (self.work / "data").symlink_to(REPO / "data")
        url = f"sqlite:///{self.work}/var/mlsignal.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
        self.env.update({"MLSIGNAL_DATABASE_URL": url, "MLSIGNAL_MODEL_DIR": str(self.work / "var" / "models")})
        self.settings = Settings(database_url=url, model_dir=self.work / "var" / "models", model_poll_seconds=0.2)
        self.servers: list = []

    def start(self, command: str) -> None:
        from inference_service.server import start as start_inference
        from training_service.server import start as start_training

        program = command.split()[0].rsplit("/", 1)[-1]
        start, var = {"mlsignal-training": (start_training, "MLSIGNAL_TRAINING_ADDR"),
                      "mlsignal-inference": (start_inference, "MLSIGNAL_INFERENCE_ADDR")}[program]
        running = start(self.settings, "127.0.0.1:0")
        self.servers.append(running)
        self.env[var] = f"127.0.0.1:{running.port}"

    def stop(self) -> None:
        for running in reversed(self.servers):
            running.stop(0.5)
        self.servers.clear()

    def run(self, command: str, expected: tuple[int, ...] = (0,),
            timeout: float = 180) -> subprocess.CompletedProcess:
        started = time.monotonic()
        if command.startswith("python:"):
            args = [str(VENV_BIN / "python"), "-c", command[len("python:"):]]
        else:
            args = ["bash", "-c", command]
        result = subprocess.run(args, cwd=self.work, env=self.env, text=True, capture_output=True, timeout=timeout)
        print(f"{time.monotonic() - started:5.1f}s  {command.splitlines()[0]}")
        assert result.returncode in expected, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result


@pytest.mark.skipif(not (VENV_BIN / "mlsignal").exists(), reason="needs the project's .venv (make venv)")
def test_operating_it_commands_run_as_written(tmp_path):
    operating = section(README.read_text(), "Operating it").split("\n### ", 1)[0]  # compose: test_compose.py
    commands = [c for block in shell_blocks(operating) for c in block]
    assert any("mlsignal-training &" in c for c in commands) and any("mlsignal train " in c for c in commands)

    clone = Clone(tmp_path)
    job_id = ""
    t0 = time.monotonic()
    try:
        for command in commands:
            if command.split("#")[0].strip().endswith("&"):  # a long-running server: this test runs its own
                clone.start(command)
                continue
            expected = (0,)
            if "JOB_ID" in command:
                assert job_id, "JOB_ID is used before a job was trained"
                command = command.replace("JOB_ID", job_id)
                expected = (0, 2)  # the job has finished by now: FAILED_PRECONDITION, exit 2 (as documented)
            result = clone.run(command, expected, timeout=120)
            if result.returncode == 2:
                assert "FAILED_PRECONDITION" in result.stderr, result.stderr
            found = re.search(r"^job\s+([0-9a-f-]{8,})$", result.stdout, flags=re.M)
            if " train " in f" {command} " and found:
                job_id = found.group(1)
    finally:
        clone.stop()
    assert job_id
    assert (clone.work / "var" / "signals.csv").exists() and (clone.work / "var" / "with_signals.csv").exists()
    assert time.monotonic() - t0 < 120


@pytest.mark.skipif(not (VENV_BIN / "mlsignal").exists(), reason="needs the project's .venv (make venv)")
def test_first_hour_runs_as_written(tmp_path):
    commands = [c for block in shell_blocks(section(README.read_text(), "First hour")) for c in block]
    assert commands[0] == "make demo" and commands[-1] == "kill %1 %2"
    assert any(c.startswith("python:") for c in commands)
    clone = Clone(tmp_path)
    outputs: dict[str, str] = {}
    model_id = ""
    try:
        # the state `make demo` leaves: the database with the sample, then (below) one serving model
        clone.run(".venv/bin/mlsignal data import data/btcusd_1h_coinbase_2017-2019.csv.gz --symbol BTC/USD "
                  "--timeframe 1h")
        for command in commands[1:]:
            if command.split("#")[0].strip().endswith("&"):
                clone.start(command)
                if len(clone.servers) == 2:
                    demo = clone.run(".venv/bin/mlsignal train --symbol BTC/USD --timeframe 1h --start 2018-06-01 "
                                     "--end 2019-01-01 --trees 20").stdout
                    assert "stage  SERVING" in demo, demo
                continue
            if command == "kill %1 %2":
                clone.stop()
                continue
            if "MODEL_ID" in command:
                assert model_id, f"MODEL_ID is used before a model was trained: {command}"
                command = command.replace("MODEL_ID", model_id)
            result = clone.run(command)
            out = outputs[command] = result.stdout + result.stderr
            found = re.search(r"^model\s+(\S+)$", out, flags=re.M)
            if " train " in f" {command} " and found:
                model_id = found.group(1)
    finally:
        clone.stop()

    def output(prefix: str) -> str:
        return next(out for command, out in outputs.items() if command.startswith(prefix))

    assert model_id
    assert "0 inserted" in output(".venv/bin/mlsignal data import")
    assert "unchanged" in output(".venv/bin/mlsignal data push")
    assert "stage  SHADOW" in output(".venv/bin/mlsignal train"), "the demo's model serves: a new one is a shadow"
    assert "336 rows, 237 ready" in output(".venv/bin/mlsignal predict")
    streamed = [line for line in output(".venv/bin/mlsignal stream").splitlines() if line.startswith("2019-09-")]
    assert len(streamed) == 120 and sum("ready=yes" in line for line in streamed) == 21
    history = output(".venv/bin/mlsignal models history")
    assert "checked by hand" in history and "back to the demo's model" in history
    assert (clone.work / "var" / "with_signals.csv").exists() and (clone.work / "var" / "monitor.png").exists()
    assert len(list((clone.work / "var").glob("report-*.html"))) == 1
