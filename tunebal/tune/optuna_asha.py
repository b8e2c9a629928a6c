"""OptunaSearch that tells Optuna the truth about trials ASHA stopped early.

Ray's OptunaSearch reports each epoch's value as an Optuna intermediate value and, when a
trial ends, tells the study COMPLETE with the last value. A trial that ASHA stopped at a
low rung would therefore enter TPE's model as a *finished* trial with a truncated score,
as if a 2-epoch accuracy were the configuration's final accuracy.

tunebal's choice: a trial that ends (without error) before ``max_epochs`` reached is told
to Optuna as PRUNED. Its intermediate values are already in the study, and Optuna's TPE
ranks pruned trials behind complete ones, by the step they reached and then by their last
value (``TPESampler`` with its default handling of pruned trials). So configurations ASHA
promoted count as better than those it stopped, and a truncated score is never compared
with a full-budget score as an equal. Errored trials stay FAIL.
"""

from __future__ import annotations

from typing import Dict, Optional

from ray.tune.search.optuna import OptunaSearch


class AshaAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, max_epochs: int, epoch_key: str = "training_iteration", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._epoch_key = epoch_key

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        if int(result.get(self._epoch_key, self._max_epochs)) >= self._max_epochs:
            return super().on_trial_complete(trial_id, result, error)
        import optuna

        trial = self._ot_trials[trial_id]
        trial.set_user_attr("stopped_at_epoch", int(result.get(self._epoch_key, 0)))  # where ASHA stopped it
        self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)
