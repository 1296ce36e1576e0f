"""Faults for the resume tests: run a training command in a child process and SIGKILL it at a chosen point.

The library carries no kill switch of its own; the faults are patched in here, in the child, before the
command runs:

- ``kill_at_step=N``: a SIGKILL as optimiser step N begins (the loop's ``lr_at`` is its first call of a step);
- ``kill_in_write=K``: a SIGKILL inside the K-th safetensors write of the process (checkpoints and the final
  weights), once half of that file is on disk, as a kill during a slow disk write would leave it;
- ``kill_after_s=T``: a SIGKILL from outside, T seconds after the child started, wherever it is then.

Run as a script: ``python tests/fault_injection.py [--kill-at-step N] [--kill-in-write K] (-m MODULE | -c CODE)
[ARGS...]``, where MODULE has a ``main(argv)``; from the tests, call ``run``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

KILLED = -signal.SIGKILL  # a child's return code after a SIGKILL


def run(
    target: list[str],
    kill_at_step: int | None = None,
    kill_in_write: int | None = None,
    kill_after_s: float | None = None,
    timeout: float = 600,
    **popen,
) -> subprocess.CompletedProcess:
    """Run ``target`` (``["-m", module, *args]`` or ``["-c", code, *args]``) with the faults asked for."""
    faults = [
        *(["--kill-at-step", str(kill_at_step)] if kill_at_step is not None else []),
        *(["--kill-in-write", str(kill_in_write)] if kill_in_write is not None else []),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", **popen.pop("env", {})}
    args = [sys.executable, str(Path(__file__).resolve()), *faults, *target]
    if kill_after_s is None:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, **popen)
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen) as p:
        try:
            out, err = p.communicate(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        return subprocess.CompletedProcess(args, p.returncode, out, err)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kill_at_step: int | None, kill_in_write: int | None) -> None:
    if kill_at_step is not None:
        from turbosparse_lib.train import loop

        lr_at = loop.lr_at

        def lr_at_or_die(step, cfg):
            if step == kill_at_step:
                _kill()
            return lr_at(step, cfg)

        loop.lr_at = lr_at_or_die
    if kill_in_write is not None:
        import safetensors.torch as st  # save_model calls save_file through this module's namespace

        save_file, writes = st.save_file, [0]

        def save_file_or_die(tensors, filename, metadata=None):
            writes[0] += 1
            save_file(tensors, filename, metadata)
            if writes[0] == kill_in_write:
                with open(filename, "r+b") as f:  # half of it reached the disk
                    f.truncate(os.path.getsize(filename) // 2)
                _kill()

        st.save_file = save_file_or_die


def main(argv: list[str]) -> None:
    faults: dict[str, int] = {}
    while argv and argv[0] in ("--kill-at-step", "--kill-in-write"):
        faults[argv[0][2:].replace("-", "_")] = int(argv[1])
        argv = argv[2:]
    _install(faults.get("kill_at_step"), faults.get("kill_in_write"))
    if len(argv) < 2 or argv[0] not in ("-m", "-c"):
        raise SystemExit("usage: fault_injection.py [--kill-at-step N] [--kill-in-write K] (-m MODULE | -c CODE) ...")
    kind, what, rest = argv[0], argv[1], argv[2:]
    if kind == "-m":  # a module with a ``main(argv)``, as every console script of the library has
        sys.exit(importlib.import_module(what).main(rest))
    else:
        sys.argv = ["-c", *rest]
        exec(compile(what, "<fault_injection -c>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main(sys.argv[1:])
