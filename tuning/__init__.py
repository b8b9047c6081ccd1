"""Ray Tune sweeps over WS-DAN hyper-parameters: configs (space.py), the trial (trial.py),
results (report.py) and the entry point (sweep.py: ``python -m tuning.sweep``)."""
