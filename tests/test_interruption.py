"""A stage killed mid-write (SIGKILL: no cleanup code runs) leaves nothing that looks valid,
and the next `dvc repro` finishes with every output whole. A stage sent Ctrl-C (SIGINT to
its process group, as a terminal sends it) stops with exit status 130 and no output, even
when the KeyboardInterrupt the signal raised was swallowed on its way up."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import (
    FROM_TRAIN_HEAD,
    REPO,
    UPSTREAM,
    dvc,
    locked_outs,
    read_metrics,
    stages_run,
)

from retrain.atomic import STAGING, write_json
from retrain.errors import exits_cleanly, handle_interrupts_from_here
from retrain.workspace import pipeline_env


class SignalledWhenCollected:
    """Sends this process SIGINT from its finalizer, as Ctrl-C lands in TensorFlow's
    `AtomicFunction.__del__` during tracing: Python prints "Exception ignored" and goes on."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


@pytest.fixture
def dropped(monkeypatch):
    """What Python drops from finalizers ("Exception ignored in ... __del__"), recorded
    instead of printed (and instead of pytest's warning about it)."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(
        unraisable.exc_type))
    return dropped


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_command(tmp_path, capsys, dropped):
    @exits_cleanly
    def command():
        SignalledWhenCollected()  # collected at once; its KeyboardInterrupt is dropped
        write_json(tmp_path / "out.json", {"whole": True})

    with pytest.raises(SystemExit) as stopped:
        command()
    assert stopped.value.code == 130
    assert not (tmp_path / "out.json").exists()
    assert not list(tmp_path.iterdir())  # no temporary file either
    assert dropped == [KeyboardInterrupt]
    assert "error: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# Ctrl-C while a stage script is still importing (numpy, PIL, TensorFlow: its first second
# or two), before its main installs `exits_cleanly`: as a plain KeyboardInterrupt, and as
# the ImportError a C extension being imported can turn it into.
DURING_IMPORTS = {
    "plain": "import signal; signal.raise_signal(signal.SIGINT)",
    "as an ImportError": ("import signal\ntry:\n    signal.raise_signal(signal.SIGINT)\n"
                          "except KeyboardInterrupt as exc:\n"
                          "    raise ImportError('initialization failed') from exc"),
}


@pytest.mark.parametrize("how", DURING_IMPORTS)
def test_ctrl_c_during_a_scripts_imports_exits_130_without_a_traceback(how):
    script = "import retrain.interrupts\n" + DURING_IMPORTS[how] + "\nprint('went on')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1:] == ["error: interrupted"], done.stderr
    assert "Traceback" not in done.stderr and "went on" not in done.stdout


def test_every_stage_script_handles_ctrl_c_before_its_other_imports():
    import ast

    for script in sorted((REPO / "stages").glob("*.py")):
        body = ast.parse(script.read_text()).body
        first_import = next(node for node in body
                            if isinstance(node, ast.Import | ast.ImportFrom))
        assert isinstance(first_import, ast.Import), script.name
        assert [alias.name for alias in first_import.names] == ["retrain.interrupts"], \
            script.name


def test_ctrl_c_turned_into_another_error_still_exits_130(capsys):
    @exits_cleanly
    def command():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt as exc:  # what a C extension module does while importing
            raise ImportError("initialization failed") from exc

    with pytest.raises(SystemExit) as stopped:
        command()
    assert stopped.value.code == 130
    assert "error: interrupted" in capsys.readouterr().err


def test_a_command_after_an_interrupted_one_runs(tmp_path, dropped):
    @exits_cleanly
    def interrupted():
        SignalledWhenCollected()

    with pytest.raises(SystemExit):
        interrupted()
    assert dropped == [KeyboardInterrupt]
    exits_cleanly(lambda: write_json(tmp_path / "out.json", {}))()  # the flag is per command
    assert (tmp_path / "out.json").exists()


def test_a_stage_run_in_process_leaves_its_caller_as_it_found_it(tmp_path, dropped):
    # A stage run by `runpy` (as tests and notebooks do) installs its Ctrl-C handling from its
    # first import; once its command returns, the caller's handler and excepthook are back
    # and a later command starts with no Ctrl-C on record.
    hook = sys.excepthook
    handle_interrupts_from_here()  # what `import retrain.interrupts` does
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler

    @exits_cleanly
    def interrupted():
        SignalledWhenCollected()

    with pytest.raises(SystemExit) as stopped:
        interrupted()
    assert stopped.value.code == 130 and dropped == [KeyboardInterrupt]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sys.excepthook is hook
    write_json(tmp_path / "outside.json", {})  # code outside any command is not stopped
    exits_cleanly(lambda: write_json(tmp_path / "out.json", {}))()
    assert (tmp_path / "out.json").exists()


def test_a_ctrl_c_swallowed_inside_a_nested_command_still_stops_the_outer_one(tmp_path,
                                                                             dropped):
    # `python -m retrain report`: the CLI's main (a command) calls report's main (another).
    @exits_cleanly
    def inner():
        SignalledWhenCollected()  # swallowed, as during the CLI's imports

    @exits_cleanly
    def outer():
        try:
            inner()
        except SystemExit:
            pass  # whatever the inner command did, the outer one must not go on
        write_json(tmp_path / "out.json", {})

    with pytest.raises(SystemExit) as stopped:
        outer()
    assert stopped.value.code == 130 and dropped == [KeyboardInterrupt]
    assert not (tmp_path / "out.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def kill_repro_when(workspace, ready, *options, timeout=600):
    """Start `dvc repro OPTIONS`, SIGKILL its whole process group once `ready()` is true."""
    log = open(workspace / "repro.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *options], cwd=workspace,
                               env=pipeline_env(workspace), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, (workspace / "repro.log").read_text()
            assert time.monotonic() < deadline, "the stage never started writing"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


def temporary_outputs(workspace, folder):
    return list((workspace / folder).glob(".tmp-*")) if (workspace / folder).exists() else []


def running(log, stage) -> bool:
    """Whether a `dvc repro` log has reached `stage` (DVC's log lines are flushed at once)."""
    return f"Running stage '{stage}'" in (log.read_text() if log.exists() else "")


def finetune_epoch_started(log) -> bool:
    text = log.read_text() if log.exists() else ""
    return "Epoch 1/" in text.partition("Running stage 'finetune'")[2]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extract", "crossval", "finetune", "export"])
def test_ctrl_c_stops_each_long_stage_and_leaves_no_output(workspace, stage,
                                                           pipeline_stage_seconds):
    """Two tries, each signalled at a new random moment of the stage's run as long as it
    took in the session's pipeline run, one in each half (imports and model building; the
    heavy loop, conversion and writing): `python bench/bench_interrupt.py` runs 20 per
    stage."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_interrupt import interrupt_stage

    _, tries = interrupt_stage(workspace, stage, 2, pipeline_env(workspace), random.Random(),
                               reference=pipeline_stage_seconds[stage])
    for signalled in (t for t in tries if t.counted):
        # 130 from the stage's handler; killed by SIGINT when it came before the stage's
        # own imports were done (Python's default handler, then its exit by the signal).
        assert signalled.returncode in (130, -signal.SIGINT), signalled
        assert not signalled.outputs_left, signalled
    assert not temporary_outputs(workspace, "data") and not temporary_outputs(workspace,
                                                                              "models")


def without_timings(metrics: dict[str, dict]) -> dict[str, dict]:
    """`read_metrics` less the figures that measure speed, which no two runs share."""
    metrics["reports/details/extract.json"].pop("images_per_second")
    metrics["reports/details/finetune.json"].pop("train_images_per_second")
    for entry in metrics["reports/details/export.json"].values():
        entry.pop("latency_ms")
    for path, row in metrics.items():
        if path.startswith("metrics/export/"):
            row.pop("latency_ms")
    return metrics


@pytest.mark.slow
def test_killed_extract_and_killed_finetune_then_repro_finishes_as_the_first_run(workspace):
    """The stages up to extract re-run (`--force`), then those up to fine-tuning, each run
    killed on the way, and a last repro end where the session's first run ended: the same
    manifests and features byte for byte, and exactly the same figures (speed aside).
    Nothing a killed run left behind changes a result."""
    before_outs, before_metrics = locked_outs(workspace), read_metrics(workspace)

    # 1. SIGKILL while extract writes its features (in the staging area, not in data/).
    log = workspace / "repro.log"
    kill_repro_when(workspace, lambda: running(log, "extract")
                    and temporary_outputs(workspace, STAGING), "--force")
    # Nothing that looks like finished features: DVC removed the old ones before running,
    # and the new ones only ever existed under a temporary name.
    assert not (workspace / "data" / "features" / "test.npy").exists()

    # 2. Fine-tuning and every stage it needs (not crossval and audit, which it does not
    # read); SIGKILL once fine-tuning has started.
    kill_repro_when(workspace, lambda: finetune_epoch_started(log), "--force", "finetune")
    assert stages_run(log.read_text()) == [*UPSTREAM, "train_head", "finetune"]
    assert not (workspace / "models" / "model.keras").exists()
    assert not (workspace / "reports" / "details" / "finetune.json").exists()

    # 3. A repro finishes the job: fine-tuning, whose outputs are gone, and every stage
    # after it. Both run for real: the run-cache would restore fine-tuning if the head file
    # came out byte-identical, and the later stages' inputs may well be byte-identical to
    # the first run's; they too must give its figures.
    result = dvc(workspace, "repro", "--force-downstream", "--no-run-cache")
    assert stages_run(result.stdout) == FROM_TRAIN_HEAD[2:], result.stdout
    assert json.loads(dvc(workspace, "status", "--json").stdout) == {}
    for folder in ("data", "models", "dvclive", STAGING):  # the killed runs' work reclaimed
        assert not temporary_outputs(workspace, folder), folder
    import keras

    import retrain.base  # noqa: F401
    keras.models.load_model(workspace / "models" / "model.keras")  # whole and loadable

    # The same results as the first run.
    after_outs = locked_outs(workspace)
    for stage in ("split", "extract"):
        # The data outputs; the stage's figures are compared below, less their timings.
        data = [path for path in before_outs[stage]
                if not path.startswith(("metrics/", "reports/details/"))]
        assert data, stage
        assert {p: after_outs[stage][p] for p in data} == {p: before_outs[stage][p] for p in data}
    assert without_timings(read_metrics(workspace)) == without_timings(before_metrics)


@pytest.mark.slow
def test_leftover_of_a_killed_fetch_never_sits_beside_restored_outputs(workspace):
    """SIGKILL during `dvc repro -f fetch`, then `dvc repro fetch` restores fetch's output
    from the run-cache without running the stage: no stage code runs to clean up, so the
    killed run's temporary folder must not be in data/ in the first place; the next stage
    that reads images extracts data/raw again."""
    shutil.rmtree(workspace / "data" / "raw")  # `-f` has DVC remove the outputs first
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal\n"
         "from retrain.atomic import atomic_path\n"
         "with atomic_path('data/raw', directory=True) as tmp:\n"
         "    (tmp / 'half.bin').write_bytes(bytes(1_000_000))\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n"],
        cwd=workspace, env=pipeline_env(workspace))  # what fetch leaves when killed mid-way
    assert killed.returncode == -signal.SIGKILL
    restored = dvc(workspace, "repro", "fetch")
    assert stages_run(restored.stdout) == [], restored.stdout  # from the run-cache
    assert not temporary_outputs(workspace, "data")
    assert json.loads(dvc(workspace, "status", "--json").stdout) == {}
    assert temporary_outputs(workspace, STAGING)  # out of the way, until a stage writes
    result = dvc(workspace, "repro", "--force", "--single-item", "split")
    assert stages_run(result.stdout) == ["split"]
    assert "data/raw is missing: extracting the archive again" in result.stdout
    assert not temporary_outputs(workspace, STAGING)


# A command whose module leaves an object that reports its own collection (the interpreter's
# teardown) and registers an exit handler; `python SCRIPT thread` keeps a non-daemon thread
# running past the command, `python SCRIPT status` returns status 3.
ENDING = """
import atexit, sys, threading, time
from pathlib import Path
from retrain.errors import exits_cleanly

class ReportsTeardown:
    def __del__(self):
        Path("teardown").touch()

kept = ReportsTeardown()
atexit.register(lambda: Path("exit-handler").touch())

@exits_cleanly
def main():
    if sys.argv[1:] == ["thread"]:
        threading.Thread(target=time.sleep, args=(0.5,)).start()
    print("done", end="")  # left in the buffer: the exit must flush it
    if sys.argv[1:] == ["status"]:
        return 3

if __name__ == "__main__":
    status = main()
    Path("returned").touch()
    sys.exit(status)
"""


@pytest.mark.parametrize("how", ["plain", "thread", "status"])
def test_a_script_command_exits_without_the_interpreter_teardown(tmp_path, how):
    script = tmp_path / "command.py"
    script.write_text(ENDING)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(script), how], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    # a command that returns a status (`sys.exit(main())`) exits with it
    assert (done.returncode, done.stdout) == (3 if how == "status" else 0, "done"), done.stderr
    assert (tmp_path / "exit-handler").exists()
    left = {path.name for path in tmp_path.iterdir()} - {"command.py", "exit-handler"}
    # with a thread Python waits for, the usual exit (which waits for it) is kept
    assert left == ({"returned", "teardown"} if how == "thread" else set())

    # Run in-process (runpy, as tests and notebooks do), the command returns to its caller.
    in_process = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path("
                                 f"{str(script)!r}, run_name='__main__')"],
                                cwd=tmp_path, env=env, capture_output=True, text=True)
    assert in_process.returncode == 0 and (tmp_path / "returned").exists(), in_process.stderr
