"""The tasks UniMP is trained on, one module each, and the registry everything iterates.

    TASKS['recommendation'].tail(builder, user, target, interaction, rng)   # what follows the history
    TASKS['preference'].evaluate(ctx, batch)                                 # one row per held-out user

Training (unimp_jax.data.pipeline draws a task per example from `data.tasks`), evaluation, prediction,
the main job's report and the benchmark all go through this dict; adding a task is one module here and
one line below (and a key in `data.tasks` and `data.task_weights`). See unimp_jax.tasks.base. The first
five are UniMP's (stage 2, on shoppers' histories); `caption` is stage 1 (image–caption pretraining).
"""

from __future__ import annotations

from unimp_jax.tasks import caption, generation, preference, recommendation, search, selection
from unimp_jax.tasks.base import EvalBatch, EvalContext, Task

TASKS: dict[str, Task] = {t.name: t for t in (recommendation.TASK, search.TASK, preference.TASK, selection.TASK,
                                               generation.TASK, caption.TASK)}
NAMES = tuple(TASKS)  # a task's index in batches ('task') and in the per-task loss sums
EVALUATED = tuple(name for name, t in TASKS.items() if t.evaluated)

__all__ = ['TASKS', 'NAMES', 'EVALUATED', 'Task', 'EvalBatch', 'EvalContext']
