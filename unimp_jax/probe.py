"""Linear probes of a model's picture features: does a colour or a kind survive the towers?

  python -m unimp_jax.probe --workdir W [--step S] [--data DATASET] [--seed 0]
  python -m unimp_jax.probe --random --config configs/tiny.py [--data DATASET] [--seed 0]

Prints held-out accuracy and chance for colour and category (unimp_jax.eval.probe says how they are
measured). `--workdir` probes a trained run's towers (a stage-1 pretraining run, or a stage-2 run);
`--random` the freshly initialised towers of a preset, the point both start from.
"""

from __future__ import annotations

import argparse

from unimp_jax import config as config_lib, runs
from unimp_jax.data import datasets, formats
from unimp_jax.eval import probe
from unimp_jax.eval.predictor import Predictor


def _random_towers(config_path: str, data: str | None):
  """(graphdef, params, dataset) of a freshly initialised model sized to the dataset."""
  cfg = config_lib.load(config_path)
  if data:
    cfg.data.path = data
  dataset = datasets.open_dataset(cfg)
  runs.resolve(cfg, dataset)
  return (*probe.random_towers(cfg), dataset)


def _trained(workdir: str, step: int | None, data: str | None):
  predictor = Predictor.from_workdir(workdir, step)  # restores a run exactly as prediction does
  dataset = formats.UnifiedDataset(data) if data else predictor.dataset
  if dataset.image_size != predictor.cfg.model.vision.image_size:
    raise ValueError(f'{dataset.path} stores {dataset.image_size} px pictures, the run\'s vision tower reads '
                     f'{predictor.cfg.model.vision.image_size} px (config.model.vision.image_size)')
  return predictor.graphdef, predictor.params, dataset


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m unimp_jax.probe', description=__doc__.split('\n')[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='A run directory (with checkpoints/): probe its trained towers.')
  source.add_argument('--random', action='store_true', help='Probe freshly initialised towers of --config.')
  parser.add_argument('--step', type=int, help='With --workdir: this checkpoint step (default: the newest).')
  parser.add_argument('--config', default='configs/tiny.py', help='With --random: the preset file[:arg].')
  parser.add_argument('--data', help='The dataset whose pictures are probed (default: the run\'s or config\'s '
                      'data.path; --random builds the embedded default there if it is missing).')
  parser.add_argument('--seed', type=int, default=0, help='The fit / held-out split of the items.')
  args = parser.parse_args(argv)
  graphdef, params, dataset = (_random_towers(args.config, args.data) if args.random
                               else _trained(args.workdir, args.step, args.data))
  result = probe.probe(graphdef, params, dataset, seed=args.seed)
  print(f'{"random towers of " + args.config if args.random else args.workdir} on {dataset.path}:\n')
  print(probe.markdown(result))
  return result


if __name__ == '__main__':
  main()
