"""User-facing errors: each becomes a one-line message and a non-zero exit, never a traceback.
Ctrl-C too: a command stops with `error: interrupted` and exit status 130."""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import threading


class UserError(Exception):
    """Bad input a user can fix: params, URLs, archives, images."""

    exit_code = 1


class ParamsError(UserError):
    exit_code = 2


class DataError(UserError):
    """A dataset, archive or image that cannot be used."""


class DownloadError(UserError):
    """A URL that could not be fetched."""


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an error (or its type name when it has no text), cut to `limit`:
    how a library's multi-line message becomes part of a one-line error."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


# Set by the SIGINT handler a command runs under (`exits_cleanly`), and never cleared
# while it runs: a Ctrl-C is remembered even where the KeyboardInterrupt it raised was lost.
_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came while this command ran, even when the
    KeyboardInterrupt the signal raised was swallowed on its way up.

    Python drops an exception raised inside a finalizer (it prints "Exception ignored in
    ... __del__"), and TensorFlow runs Python finalizers all through tracing and conversion
    (`AtomicFunction.__del__`); a C extension module that is being imported turns it into an
    ImportError, which an optional import catches. A stage calls this where stopping is
    cheap and safe: between batches and training steps, between conversions, and before an
    output is renamed into place (`retrain.atomic.atomic_path`), so a swallowed Ctrl-C costs
    at most one batch, never a valid-looking output.
    """
    if _interrupted.is_set():
        raise KeyboardInterrupt


# What `handle_interrupts_from_here` replaced, for the command's `exits_cleanly` to put back
# when it ends: a stage run in-process (a test, `runpy`) leaves its caller as it found it.
_before_the_command: tuple | None = None


def handle_interrupts_from_here() -> None:
    """For a command's script, before its heavy imports (numpy, PIL, TensorFlow take a second
    or two): a Ctrl-C from here on exits with `error: interrupted` and status 130 instead of
    a traceback, even when a C extension being imported turned it into an ImportError.
    `exits_cleanly` takes over once the command's main runs, keeping a Ctrl-C that came
    before it, and restores the handler and excepthook this replaced when it returns."""
    global _before_the_command
    _interrupted.clear()
    _before_the_command = (signal.getsignal(signal.SIGINT), sys.excepthook)
    signal.signal(signal.SIGINT, _on_sigint)
    previous_hook = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt) or _interrupted.is_set():
            _exit_interrupted(exit=os._exit)  # nothing is written yet: nothing to clean up
        previous_hook(kind, value, traceback)

    sys.excepthook = hook


def _exit_interrupted(exit=sys.exit):
    print("error: interrupted", file=sys.stderr, flush=True)
    exit(130)


def is_the_process_script(main) -> bool:
    """Whether `main` is the entry point of the script this Python process was started to
    run (`python stages/train_head.py ...`, as DVC runs a stage), not of one run in-process
    (runpy, a test, a notebook) or under interpreter options (a profiler)."""
    script = getattr(sys.modules.get(main.__module__), "__file__", None)
    argv = getattr(sys, "orig_argv", [])
    return (script is not None and len(argv) > 1
            and os.path.realpath(argv[1]) == os.path.realpath(script))


def exit_without_teardown(status: int = 0) -> None:
    """Exit with `status` as Python would, less the interpreter's teardown: after a stage
    has written its outputs, freeing TensorFlow's and Keras's modules took 0.5 to 2 s more
    (1.3 s on average for train_head on 2 cores), in every TensorFlow stage. Exit handlers
    still run and the standard streams are flushed. While a thread that Python would wait
    for is still running, this returns and the usual exit waits for it."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs before its teardown
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def exits_cleanly(main):
    """Decorate a command's entry point: a UserError prints `error: ...` and exits; Ctrl-C
    (SIGINT) prints `error: interrupted` and exits with status 130, whatever the command was
    doing (see `stop_if_interrupted`)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        global _before_the_command
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:  # only the main thread may install a signal handler
            # Ours already: a Ctrl-C during the script's imports, or an outer command (a
            # command calling another), counts; else this command starts afresh.
            if signal.getsignal(signal.SIGINT) is not _on_sigint:
                _interrupted.clear()
            previous = signal.signal(signal.SIGINT, _on_sigint)
            previous_hook = sys.excepthook
            if _before_the_command is not None:
                (previous, previous_hook), _before_the_command = _before_the_command, None
        try:
            result = main(*args, **kwargs)
            stop_if_interrupted()  # a swallowed Ctrl-C still fails the command
            if (result is None or isinstance(result, int)) and is_the_process_script(main):
                exit_without_teardown(result or 0)  # the status `sys.exit(main())` gives
            return result
        except KeyboardInterrupt:
            _exit_interrupted()
        except Exception as exc:
            # A KeyboardInterrupt that came back as another error (an ImportError from a
            # module it stopped, a library's wrapper of it) is still a Ctrl-C.
            if _interrupted.is_set():
                _exit_interrupted()
            if not isinstance(exc, UserError):
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        finally:
            if in_main_thread:
                if previous is not _on_sigint:  # the outermost command is over: its Ctrl-C
                    _interrupted.clear()  # is not the caller's
                signal.signal(signal.SIGINT, previous)
                sys.excepthook = previous_hook

    return wrapper
