"""Entry point: python main.py --config=configs/mnist/edm.py --workdir=runs/mnist --mode=train

Modes: train (resumes from the latest checkpoint in the workdir), sample (PNG grid + .npz from a checkpoint),
eval (FID / KID / IS, optionally bits/dim, of checkpoints x samplers), fid_stats (reference statistics),
tune_steps (a sampler's time grid fitted to a many-step teacher, for --config.sample.timesteps), import (a
released diffusers-layout U-Net at --config.model.init_from as the workdir's step-0 checkpoint).
Any key can be overridden with --config.a.b=value; an unknown key, a wrong type or a broken config file
stops with one line naming it, before anything is compiled.
"""

import difflib
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ('train', 'sample', 'eval', 'fid_stats', 'tune_steps', 'import')

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'mnist', 'edm.py')  # from any cwd
FLAGS = flags.FLAGS


def _fail(msg: str) -> None:
  print(f'error: {msg}', file=sys.stderr)
  sys.exit(2)


def _bad_override(argv: list[str]) -> str | None:
  """Names the first --config.a.b override whose key is not declared in configs/default.py."""
  from configs import default
  reference = default.get_config()
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0]
    node = reference
    for i, part in enumerate(path.split('.')):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        hint = difflib.get_close_matches(part, keys, n=1)
        where = '.'.join(path.split('.')[:i]) or 'the top level'
        return (f'unknown config key {path!r} in {arg.split("=", 1)[0]}: {where} has no key {part!r}'
                + (f' (did you mean {hint[0]!r}?)' if hint else ''))
      node = node[part]
  return None


def _config_file_error(e: BaseException) -> str | None:
  """Describes an error raised while a config file ran: the file, the line and the key."""
  frames = [f for f in traceback.extract_tb(e.__traceback__) if f'{os.sep}configs{os.sep}' in f.filename
            or f.filename.startswith('configs')]
  if not frames:
    return None
  f = frames[-1]
  what = ' '.join(str(e).replace('\\n', ' ').split()).strip('\'"')
  return f'{os.path.relpath(f.filename)}:{f.lineno}: `{f.line}`: {type(e).__name__}: {what}'


def _describe(argv: list[str], e: BaseException) -> str:
  """One line for an error raised while the config file ran or its overrides were applied."""
  return _bad_override(argv) or _config_file_error(e) or f'{type(e).__name__}: {" ".join(str(e).split())}'


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(' '.join(str(e).split()))
  except Exception as e:  # the config file or an override failed while loading
    _fail(_describe(argv, e))


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, jax backends) hides the progress
  config = FLAGS.config
  if not FLAGS.workdir:
    _fail('--workdir is required')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  p = config.parallel
  if p.distributed:  # before anything touches a device; None arguments are auto-detected (TPU, SLURM)
    import jax
    jax.distributed.initialize(coordinator_address=p.coordinator_address, num_processes=p.num_processes,
                               process_id=p.process_id)

  from train import checkpoint, evaluation, trainer  # imported after flag checks: nothing compiles before
  from data.errors import DataError
  with open(os.path.join(FLAGS.workdir, f'config_{FLAGS.mode}.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  try:
    if FLAGS.mode == 'train':
      trainer.train(config, FLAGS.workdir)
    elif FLAGS.mode == 'sample':
      info = trainer.sample(config, FLAGS.workdir)
      print(f'wrote {info["num_samples"]} samples ({info["sampler"]}, {info["nfe"]} NFE) from step {info["step"]} '
            f'({info["ema"]}): {info["png"]}')
    elif FLAGS.mode == 'fid_stats':
      info = evaluation.fid_stats(config)
      print(f'reference statistics: {info["stats"]} ({"cached" if info["cached"] else "computed"})')
    elif FLAGS.mode == 'tune_steps':
      info = trainer.tune_steps(config, FLAGS.workdir)
      print(f'tuned {info["num_steps"]} steps of {info["sampler"]} at step {info["step"]}: mean squared distance to '
            f'{info["teacher"]} {info["initial_mse"]:.3g} -> {info["mse"]:.3g}; {info["json"]}\n{info["flag"]}')
    elif FLAGS.mode == 'import':
      info = trainer.import_weights(config, FLAGS.workdir)
      print(f'imported {info["source"]} ({info["layout"]}, {info["num_params"]:,} parameters) as the step-0 '
            f'checkpoint of {FLAGS.workdir}')
    elif FLAGS.mode == 'eval':
      for row in evaluation.evaluate(config, FLAGS.workdir):
        print(evaluation.describe(row))
  except (DataError, checkpoint.CheckpointError, trainer.TrainingDiverged, ValueError, FileNotFoundError) as e:
    _fail(str(e))


def define_flags(argv: list[str]) -> None:
  # Without --config the default file is loaded (with the overrides in argv) right here, so its errors are
  # reported here too.
  try:
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Training / sampling configuration.',
                                    lock_config=True)
  except Exception as e:
    _fail(_describe(argv, e))
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
  flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')


if __name__ == '__main__':
  define_flags(sys.argv)
  app.run(main, flags_parser=parse_flags)
