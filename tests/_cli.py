"""Running the real command lines in a subprocess: fake CPU devices and the tests' compilation cache;
loading a shipped config file."""

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(devices: int) -> dict:
    """The environment of a CLI subprocess with ``devices`` fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
        "CINJAX_TEST_JAX_CACHE", os.path.expanduser("~/.cache/cinjax/jax-test-cache")
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_module(args, devices=2, timeout=600, module="cinjax.main", check=True):
    """``python -m module args``; with ``check`` the exit status must be 0 (the output tail is shown)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=cli_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def load_config(path: str, arg: str | None = None):
    """``get_config(arg)`` of the config file ``path`` (relative to the repository)."""
    spec = importlib.util.spec_from_file_location(
        f"cfg_{os.path.basename(path)[:-3]}", os.path.join(REPO, path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
