"""The launchers' dry runs: the exact commands they would run, with overrides arriving as written."""

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(__file__))
TUPLE = "--config.train.freeze_patterns=('^vision/',)"


def _dry_run(script, *args, **env):
  proc = subprocess.run(['bash', os.path.join('launch', script), *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, DRY_RUN='1', **env), timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def test_tpu_vm_runs_the_job_in_the_background_on_every_worker_with_overrides_intact():
  [ssh] = _dry_run('tpu_vm.sh', 'run', 'job1', 'configs/paper.py:3b', 'gs://bucket/run1', TUPLE, TPU='t', ZONE='z')
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 't'] and '--worker=all' in ssh
  remote = shlex.split(ssh[ssh.index('--command') + 1])  # as the worker's shell splits it
  main = remote[remote.index('nohup') + 1:remote.index('>')]
  assert main == ['python', '-m', 'unimp_jax.main', '--multihost', '--config', 'configs/paper.py:3b', '--workdir',
                  'gs://bucket/run1', TUPLE]
  assert remote[remote.index('>') + 1] == '~/job1.log'
  [stop] = _dry_run('tpu_vm.sh', 'stop', 'job1', TPU='t', ZONE='z')
  assert 'kill' in stop[stop.index('--command') + 1] and '~/job1.pid' in stop[stop.index('--command') + 1]
  setup = _dry_run('tpu_vm.sh', 'setup', TPU='t', ZONE='z')
  assert [c[0] for c in setup] == ['tar', 'gcloud', 'gcloud'] and "pip install -e '.[tpu]'" in setup[2][-1]


def test_slurm_starts_one_task_per_gpu():
  [srun] = _dry_run('slurm.sbatch', 'configs/paper.py:3b', '/shared/run1', TUPLE)
  assert srun[0] == 'srun' and srun[srun.index('python'):] == [
      'python', '-m', 'unimp_jax.main', '--multihost', '--config', 'configs/paper.py:3b', '--workdir', '/shared/run1',
      TUPLE]
  with open(os.path.join(ROOT, 'launch', 'slurm.sbatch')) as f:
    header = f.read()
  assert '#SBATCH --ntasks-per-node=8' in header and '#SBATCH --gpus-per-node=8' in header


def test_local_processes_share_one_coordinator():
  commands = _dry_run('local.sh', 'configs/tiny.py', 'workdir/x', TUPLE, PROCESSES='2')
  assert len(commands) == 2
  for i, command in enumerate(commands):
    assert command[command.index('--process_id') + 1] == str(i) and command[command.index('--num_processes') + 1] == '2'
    assert TUPLE in command and command[-1] == f'workdir/x/process-{i}.log'
  assert commands[0][commands[0].index('--coordinator') + 1] == commands[1][commands[1].index('--coordinator') + 1]
