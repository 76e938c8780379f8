"""Running main.py in a subprocess with a tiny model, as the tests' users would run it (or its config, in process)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny DDPM++ that compiles in seconds on 2 CPU cores.
TINY = [
    '--config=configs/mnist/ddpmpp_vp.py',
    '--config.model.nf=8', '--config.model.ch_mult=(1,2)', '--config.model.num_res_blocks=1',
    '--config.model.attn_resolutions=(16,)', '--config.model.num_groups=2',
    '--config.training.batch_size=8', '--config.training.progress_bar=False',
    '--config.optim.warmup_steps=5', '--config.data.num_threads=1',
    '--config.sample.num_steps=3', '--config.sample.num_samples=4', '--config.sample.batch_size=4',
]


def tiny_config(*overrides: str):
  """The config main.py builds from TINY and `overrides` ('--config.a.b=value', values as Python literals), in
  process; locked, so a mistyped key fails as on the command line."""
  import ast
  import importlib

  def value(text):
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text  # a bare string

  config = importlib.import_module(TINY[0].split('=', 1)[1].removesuffix('.py').replace('/', '.')).get_config()
  config.lock()
  config.update_from_flattened_dict(dict((k, value(v)) for k, v in (o.split('=', 1) for o in (*TINY[1:], *overrides))),
                                    strip_prefix='--config.')
  return config


def env() -> dict[str, str]:
  e = dict(os.environ, PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu')
  e.pop('XLA_FLAGS', None)
  return e


def main_py(*args: str, workdir: str | None = None, check: bool = False, timeout: float = 600,
            tiny: bool = True, cwd: str = ROOT) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), *(TINY if tiny else []), *args]
  if workdir is not None:
    cmd.append(f'--workdir={workdir}')
  proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'main.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc


def popen_main(*args: str, workdir: str) -> subprocess.Popen:
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), *TINY, *args, f'--workdir={workdir}']
  return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def error_lines(stderr: str) -> list[str]:
  """The lines main.py printed as errors (library warnings filtered out)."""
  return [l for l in stderr.splitlines() if l.startswith('error:')]
